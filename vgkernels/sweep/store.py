"""Append-only, resumable result shards of a sweep, and their merge.

Layout of ``OUT/``::

    meta.json                  what was swept (model, data, prompts, L, H); a resume
                               refuses to mix results of a different configuration
    shards/index.r{R}.jsonl    one line per finished sample of rank R (id, fields, N,
                               mask, offsets)
    shards/heads.r{R}.f32      per sample: float32 (6, L, H) head metrics
    shards/layers.r{R}.f32     per sample: float32 (6, L) layer metrics
    shards/maps.r{R}.bin       optional raw maps (see :func:`encode_maps`)
    shards/rejects.r{R}.jsonl  samples that failed while running (unreadable image …)
    rejects.jsonl              after the merge: parse-time and run-time rejects
    samples.jsonl              after the merge: one line per sample, dataset order
    head_metrics.npy           after the merge: float32 (n, 6, L, H)
    layer_metrics.npy          after the merge: float32 (n, 6, L)

The six metrics, in order, are :data:`METRICS`: AR, KL, JS of the question prompt's
maps, then the same of the maps divided by the reference prompt's maps.

Crash safety: a batch's binary records are written and ``fsync``-ed before its index
lines, and the index lines are ``fsync``-ed before the batch counts as done. On opening,
:class:`ShardWriter` cuts a partial trailing index line and any binary bytes beyond the
last indexed record, so a sweep killed at any instant resumes with exactly the samples
whose index lines are complete — none recomputed, none duplicated.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

METRICS = ("ar", "kl", "js", "ar_ref", "kl_ref", "js_ref")
FORMAT_VERSION = 1


@dataclass
class SampleResult:
    """What one sample contributes: metrics and, optionally, its raw maps.

    ``head (6, L, H)`` and ``layer (6, L)`` float32 in :data:`METRICS` order;
    ``maps_q``/``maps_ref`` ``(L, H, N)`` float32 and ``cells (N, 4)`` when raw maps
    are kept.
    """

    sample: object  # datasets.Sample
    head: np.ndarray
    layer: np.ndarray
    N: int
    grid: tuple
    mask_kind: str
    mask_tokens: int
    image_size: Optional[tuple] = None
    maps_q: Optional[np.ndarray] = None
    maps_ref: Optional[np.ndarray] = None
    cells: Optional[np.ndarray] = None
    #: JSON-able per-sample extras carried into ``samples.jsonl`` (``--profile authors``:
    #: ``{"authors": (6, L) metrics}``)
    extra: Optional[dict] = None


def encode_maps(maps_q: np.ndarray, maps_ref: np.ndarray, cells: np.ndarray) -> bytes:
    """Raw maps as bytes: per (prompt, layer, head) row a float32 scale (the row's max),
    then the rows divided by their scale as float16, then ``cells`` as float32.

    Dividing by the row maximum keeps about three significant digits for every token,
    where plain float16 would flush attention below 6e-8 to zero.
    """
    both = np.stack([maps_q, maps_ref]).astype(np.float32)  # (2, L, H, N)
    scale = np.nanmax(both, axis=-1) if both.shape[-1] else np.zeros(both.shape[:-1], np.float32)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0).astype(np.float32)
    rows = (both / scale[..., None]).astype(np.float16)
    return scale.tobytes() + rows.tobytes() + np.asarray(cells, np.float32).tobytes()


def maps_nbytes(L: int, H: int, N: int) -> int:
    return 2 * L * H * 4 + 2 * L * H * N * 2 + N * 4 * 4


def decode_maps(buf: bytes, L: int, H: int, N: int):
    """Inverse of :func:`encode_maps`: ``(maps_q, maps_ref, cells)`` as float32."""
    o = 0
    scale = np.frombuffer(buf, np.float32, 2 * L * H, o).reshape(2, L, H)
    o += scale.nbytes
    rows = np.frombuffer(buf, np.float16, 2 * L * H * N, o).reshape(2, L, H, N)
    o += rows.nbytes
    cells = np.frombuffer(buf, np.float32, N * 4, o).reshape(N, 4)
    maps = rows.astype(np.float32) * scale[..., None]
    return maps[0], maps[1], cells.copy()


def read_maps(out_dir: str, rec: dict, L: int, H: int):
    """Raw maps of one merged ``samples.jsonl`` record, or None when not kept."""
    if rec.get("maps_file") is None:
        return None
    N = int(rec["N"])
    with open(os.path.join(out_dir, rec["maps_file"]), "rb") as f:
        f.seek(int(rec["maps_offset"]))
        buf = f.read(maps_nbytes(L, H, N))
    return decode_maps(buf, L, H, N)


def _fsync(f):
    f.flush()
    os.fsync(f.fileno())


def _read_index(path: str):
    """Complete JSON lines of an index file and the byte length they occupy."""
    recs, good = [], 0
    if not os.path.exists(path):
        return recs, 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        try:
            recs.append(json.loads(data[pos:nl]))
        except json.JSONDecodeError:
            break
        pos = nl + 1
        good = pos
    return recs, good


def read_meta(out_dir: str) -> Optional[dict]:
    p = os.path.join(out_dir, "meta.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def check_or_write_meta(out_dir: str, meta: dict, *, write: bool) -> dict:
    """Compare ``meta`` with ``OUT/meta.json``: a resume must sweep the same thing.

    Only keys that change results are compared (``fingerprint``). ``write`` (rank 0)
    creates the file on a fresh directory.
    """
    old = read_meta(out_dir)
    if old is not None:
        if old.get("fingerprint") != meta.get("fingerprint"):
            diff = {k: (old.get("fingerprint", {}).get(k), v) for k, v in meta["fingerprint"].items()
                    if old.get("fingerprint", {}).get(k) != v}
            raise ValueError(f"out: {out_dir!r} holds a sweep with other settings (old, new): {diff}; "
                             f"use another --out or --overwrite")
        return old
    if write:
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(out_dir, "meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(out_dir, "meta.json"))
    return meta


def done_ids(out_dir: str) -> set:
    """Ids of samples finished, or rejected for good, by any rank so far.

    A sample rejected for a missing or unreadable image (``"retry": true``) is not done:
    the next run tries it again.
    """
    ids = set()
    for pat in ("index.r*.jsonl", "rejects.r*.jsonl"):
        for p in glob.glob(os.path.join(out_dir, "shards", pat)):
            recs, _ = _read_index(p)
            ids.update(r["sid"] for r in recs if r.get("sid") is not None and not r.get("retry"))
    return ids


class ShardWriter:
    """One rank's append-only shard files; repairs a torn tail on opening."""

    def __init__(self, out_dir: str, rank: int, L: int, H: int):
        self.dir = os.path.join(out_dir, "shards")
        os.makedirs(self.dir, exist_ok=True)
        self.L, self.H = int(L), int(H)
        self.rank = int(rank)
        p = lambda name: os.path.join(self.dir, f"{name}.r{self.rank}")
        self.paths = {"index": p("index") + ".jsonl", "heads": p("heads") + ".f32",
                      "layers": p("layers") + ".f32", "maps": p("maps") + ".bin",
                      "rejects": p("rejects") + ".jsonl"}
        self._repair()
        self._f = {k: open(v, "ab") for k, v in self.paths.items()}

    @property
    def head_bytes(self) -> int:
        return 6 * self.L * self.H * 4

    @property
    def layer_bytes(self) -> int:
        return 6 * self.L * 4

    def _repair(self):
        recs, good = _read_index(self.paths["index"])
        sizes = {k: os.path.getsize(v) if os.path.exists(v) else 0 for k, v in self.paths.items()}
        # Keep the longest prefix of index lines whose binary records are all on disk.
        n = 0
        maps_end = 0
        for r in recs:
            need_h = (r["row"] + 1) * self.head_bytes
            need_l = (r["row"] + 1) * self.layer_bytes
            m_end = maps_end
            if r.get("maps_offset") is not None:
                m_end = r["maps_offset"] + maps_nbytes(self.L, self.H, r["N"])
            if r["row"] != n or need_h > sizes["heads"] or need_l > sizes["layers"] or m_end > sizes["maps"]:
                break
            n += 1
            maps_end = m_end
        if n < len(recs):
            good = 0
            with open(self.paths["index"], "rb") as f:
                for _ in range(n):
                    good += len(f.readline())
        self.rows = n
        self.maps_end = maps_end
        for key, size in (("index", good), ("heads", n * self.head_bytes), ("layers", n * self.layer_bytes),
                          ("maps", maps_end)):
            path = self.paths[key]
            if os.path.exists(path) and os.path.getsize(path) != size:
                os.truncate(path, size)
        _, rgood = _read_index(self.paths["rejects"])
        if os.path.exists(self.paths["rejects"]) and os.path.getsize(self.paths["rejects"]) != rgood:
            os.truncate(self.paths["rejects"], rgood)

    def append(self, results: list) -> None:
        """Write a batch of :class:`SampleResult`; durable when this returns."""
        if not results:
            return
        lines = []
        for res in results:
            head = np.ascontiguousarray(res.head, dtype=np.float32)
            layer = np.ascontiguousarray(res.layer, dtype=np.float32)
            if head.shape != (6, self.L, self.H) or layer.shape != (6, self.L):
                raise ValueError(f"result of {res.sample.sid}: expected head (6, {self.L}, {self.H}) and "
                                 f"layer (6, {self.L}), got {head.shape} and {layer.shape}")
            self._f["heads"].write(head.tobytes())
            self._f["layers"].write(layer.tobytes())
            maps_offset = None
            if res.maps_q is not None:
                blob = encode_maps(res.maps_q, res.maps_ref, res.cells)
                maps_offset = self.maps_end
                self._f["maps"].write(blob)
                self.maps_end += len(blob)
            rec = {"sid": res.sample.sid, "index": res.sample.index, "row": self.rows, "N": int(res.N),
                   "grid": list(res.grid), "mask": res.mask_kind, "mask_tokens": int(res.mask_tokens),
                   "image_size": list(res.image_size) if res.image_size else None,
                   "maps_offset": maps_offset, "sample": res.sample.to_json()}
            if res.extra is not None:
                rec["extra"] = res.extra
            lines.append(json.dumps(rec, default=_json_default) + "\n")
            self.rows += 1
        for k in ("heads", "layers", "maps"):
            _fsync(self._f[k])
        self._f["index"].write("".join(lines).encode())
        _fsync(self._f["index"])

    def reject(self, rejects: list) -> None:
        if not rejects:
            return
        self._f["rejects"].write("".join(json.dumps(r.to_json(), default=_json_default) + "\n"
                                         for r in rejects).encode())
        _fsync(self._f["rejects"])

    def close(self):
        for f in self._f.values():
            f.close()


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def _nan_to_none(values):
    return [None if not np.isfinite(v) else float(v) for v in values]


def merge(out_dir: str, parse_rejects: list) -> dict:
    """Gather every rank's shards into the dataset-ordered outputs (see module doc).

    Returns ``{"samples": n, "rejects": r}``. Safe to repeat; shards are left in place
    (they are the resume state and hold the raw maps that ``samples.jsonl`` points at).
    """
    meta = read_meta(out_dir)
    if meta is None:
        raise ValueError(f"{out_dir!r} has no meta.json: not a sweep directory")
    L, H = int(meta["L"]), int(meta["H"])
    hb, lb = 6 * L * H * 4, 6 * L * 4
    shard_dir = os.path.join(out_dir, "shards")
    rows = []
    for p in sorted(glob.glob(os.path.join(shard_dir, "index.r*.jsonl"))):
        rank = int(re.search(r"index\.r(\d+)\.jsonl$", p).group(1))
        recs, _ = _read_index(p)
        hpath = os.path.join(shard_dir, f"heads.r{rank}.f32")
        lpath = os.path.join(shard_dir, f"layers.r{rank}.f32")
        heads = np.fromfile(hpath, np.float32) if os.path.exists(hpath) else np.zeros(0, np.float32)
        layers = np.fromfile(lpath, np.float32) if os.path.exists(lpath) else np.zeros(0, np.float32)
        nrec = min(len(recs), heads.size * 4 // hb if hb else 0, layers.size * 4 // lb if lb else 0)
        heads = heads[: nrec * hb // 4].reshape(nrec, 6, L, H)
        layers = layers[: nrec * lb // 4].reshape(nrec, 6, L)
        for r in recs[:nrec]:
            rows.append((r, heads[r["row"]], layers[r["row"]], rank))
    rows.sort(key=lambda t: t[0]["index"])
    seen, out_rows = set(), []
    for t in rows:
        if t[0]["sid"] in seen:
            continue
        seen.add(t[0]["sid"])
        out_rows.append(t)
    n = len(out_rows)
    head_arr = np.stack([t[1] for t in out_rows]) if n else np.zeros((0, 6, L, H), np.float32)
    layer_arr = np.stack([t[2] for t in out_rows]) if n else np.zeros((0, 6, L), np.float32)
    np.save(os.path.join(out_dir, "head_metrics.npy.tmp.npy"), head_arr)
    os.replace(os.path.join(out_dir, "head_metrics.npy.tmp.npy"), os.path.join(out_dir, "head_metrics.npy"))
    np.save(os.path.join(out_dir, "layer_metrics.npy.tmp.npy"), layer_arr)
    os.replace(os.path.join(out_dir, "layer_metrics.npy.tmp.npy"), os.path.join(out_dir, "layer_metrics.npy"))
    tmp = os.path.join(out_dir, "samples.jsonl.tmp")
    with open(tmp, "w") as f:
        for i, (r, _, lay, rank) in enumerate(out_rows):
            s = r["sample"]
            rec = {"row": i, "sid": r["sid"], "index": r["index"], "image": s["image"], "question": s["question"],
                   "boxes": s["boxes"], "fields": s["fields"], "N": r["N"], "grid": r["grid"],
                   "image_size": r.get("image_size"), "mask": r["mask"], "mask_tokens": r["mask_tokens"],
                   "maps_file": (f"shards/maps.r{rank}.bin" if r.get("maps_offset") is not None else None),
                   "maps_offset": r.get("maps_offset")}
            for j, name in enumerate(METRICS):
                rec[name] = _nan_to_none(lay[j])
            if r.get("extra") is not None:
                rec["extra"] = r["extra"]
            f.write(json.dumps(rec, default=_json_default) + "\n")
    os.replace(tmp, os.path.join(out_dir, "samples.jsonl"))
    rejects = [r.to_json() if hasattr(r, "to_json") else r for r in parse_rejects]
    rejects += run_rejects(out_dir, done={t[0]["sid"] for t in out_rows})
    with open(os.path.join(out_dir, "rejects.jsonl.tmp"), "w") as f:
        for r in rejects:
            f.write(json.dumps(r, default=_json_default) + "\n")
    os.replace(os.path.join(out_dir, "rejects.jsonl.tmp"), os.path.join(out_dir, "rejects.jsonl"))
    from .tables import write_parquet

    write_parquet(out_dir, meta, [_merged_record(t, i) for i, t in enumerate(out_rows)], head_arr, layer_arr)
    return {"samples": n, "rejects": len(rejects)}


def read_rejects(out_dir: str) -> list:
    """The merged ``rejects.jsonl`` records."""
    p = os.path.join(out_dir, "rejects.jsonl")
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [json.loads(t) for t in f if t.strip()]


def run_rejects(out_dir: str, done=()) -> list:
    """Rejects written while running, every rank: one per sample id (its latest), none for
    a sample that has results (rejected once for a missing image, then computed)."""
    done = set(done)
    latest, order = {}, []
    for p in sorted(glob.glob(os.path.join(out_dir, "shards", "rejects.r*.jsonl"))):
        recs, _ = _read_index(p)
        for r in recs:
            key = r.get("sid") if r.get("sid") is not None else ("line", r.get("source"), r.get("line"))
            if key in done:
                continue
            if key not in latest:
                order.append(key)
            latest[key] = r
    return [latest[k] for k in order]


def _merged_record(t, row: int) -> dict:
    r, _, _, rank = t
    s = r["sample"]
    return {"row": row, "sid": r["sid"], "index": r["index"], "image": s["image"], "question": s["question"],
            "fields": s.get("fields", {}), "N": r["N"], "grid": r["grid"], "image_size": r.get("image_size"),
            "mask": r["mask"], "mask_tokens": r["mask_tokens"]}


def load_results(out_dir: str):
    """Merged results: ``(meta, records, head (n, 6, L, H), layer (n, 6, L))``."""
    meta = read_meta(out_dir)
    if meta is None:
        raise ValueError(f"{out_dir!r}: no meta.json; expected the --out directory of a sweep")
    sp = os.path.join(out_dir, "samples.jsonl")
    if not os.path.exists(sp):
        raise ValueError(f"{out_dir!r}: no samples.jsonl; the sweep has not finished (re-run it to merge)")
    with open(sp) as f:
        recs = [json.loads(t) for t in f if t.strip()]
    head = np.load(os.path.join(out_dir, "head_metrics.npy"))
    layer = np.load(os.path.join(out_dir, "layer_metrics.npy"))
    if head.shape[0] != len(recs) or layer.shape[0] != len(recs):
        raise ValueError(f"{out_dir!r}: samples.jsonl has {len(recs)} rows but the metric arrays have "
                         f"{head.shape[0]} and {layer.shape[0]}")
    return meta, recs, head, layer
