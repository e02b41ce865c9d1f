"""Tidy Parquet tables of a merged sweep: ``OUT/layers.parquet`` and ``OUT/heads.parquet``.

Written by :func:`vgkernels.sweep.store.merge` next to the ``.npy`` arrays (same rows,
same values) for analysis in pandas, polars, duckdb or R::

    import pandas as pd
    df = pd.read_parquet("runs/x/layers.parquet")
    df.groupby(["modality", "layer"]).kl_ref.mean()

    duckdb -c "SELECT layer, head, avg(kl_ref) FROM 'runs/x/heads.parquet' GROUP BY ALL ORDER BY 3 LIMIT 20"

``layers.parquet`` has one row per sample × captured layer (the head-mean map's metrics),
``heads.parquet`` one row per sample × captured layer × head. Columns, in order:

=================  ==========  ==========================================================
``row``            int32       the sample's row in ``samples.jsonl`` and the ``.npy`` arrays
``sid``            string      sample id (stable across runs)
``index``          int64       position in the input data
``image``          string      image path
``question``       string      the question as asked (before the answer suffix)
``layer``          int32       decoder layer index (the model's own numbering)
``head``           int32       attention head (``heads.parquet`` only)
``ar`` ... ``js_ref``  float32  :data:`~.store.METRICS`: AR, KL, JS of the question maps,
                               then of the maps divided by the reference prompt's;
                               null where not finite
``N``              int32       image tokens of the sample
``grid_h``, ``grid_w``  int32  the main token grid
``image_width``, ``image_height``  int32  the original image's size
``mask``           string      ``bbox`` or ``gt_tokens``: what the ground truth came from
``mask_tokens``    int32       tokens inside the ground truth
``model``          string      the swept model
then every carried field  one column per field (``label``, ``modality``, ``image_id``, …):
                   bool, int64, float64 or string as its values are; lists and objects as
                   JSON text; null where a sample lacks it. A field whose name is taken
                   by a column above is written as ``field_<name>``.
=================  ==========  ==========================================================
"""
from __future__ import annotations

import json
import os

import numpy as np

from .store import METRICS

BASE_COLUMNS = ("row", "sid", "index", "image", "question", "layer", "head", *METRICS, "N", "grid_h", "grid_w",
                "image_width", "image_height", "mask", "mask_tokens", "model")
_CHUNK = 256  # samples per written batch: bounded memory for 80 layers x 64 heads x 10k samples


def field_columns(records) -> dict:
    """``{column name: (field name, arrow type name)}`` for every carried field."""
    names = []
    for r in records:
        for k in r.get("fields", {}):
            if k not in names:
                names.append(k)
    out = {}
    for k in names:
        vals = [r["fields"][k] for r in records if r.get("fields", {}).get(k) is not None]
        if vals and all(isinstance(v, bool) for v in vals):
            kind = "bool"
        elif vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            kind = "int64"
        elif vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            kind = "float64"
        elif all(isinstance(v, str) for v in vals):
            kind = "string"
        else:
            kind = "json"
        col = k if k not in BASE_COLUMNS else f"field_{k}"
        while col in BASE_COLUMNS or col in out:
            col = "field_" + col
        out[col] = (k, kind)
    return out


def _field_value(v, kind):
    if v is None:
        return None
    if kind == "json":
        return v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    if kind == "float64":
        return float(v)
    return v


def _table(pa, recs, metrics, names, fcols, model, per_head: bool):
    """One chunk: ``metrics (n, 6, L[, H])`` for the records ``recs``."""
    n, L = metrics.shape[0], metrics.shape[2]
    H = metrics.shape[3] if per_head else 1
    per = L * H
    sample = np.repeat(np.arange(n), per)
    layer = np.tile(np.repeat(np.asarray(names, np.int32), H), n)
    cols = {}

    def rep(values, typ):
        return pa.array(values, type=typ).take(pa.array(sample))

    cols["row"] = rep([r["row"] for r in recs], pa.int32())
    cols["sid"] = rep([str(r["sid"]) for r in recs], pa.string())
    cols["index"] = rep([int(r["index"]) for r in recs], pa.int64())
    cols["image"] = rep([str(r["image"]) for r in recs], pa.string())
    cols["question"] = rep([r["question"] for r in recs], pa.string())
    cols["layer"] = pa.array(layer, pa.int32())
    if per_head:
        cols["head"] = pa.array(np.tile(np.arange(H, dtype=np.int32), n * L), pa.int32())
    flat = np.moveaxis(metrics, 1, -1).reshape(n * per, len(METRICS)).astype(np.float32)
    for j, m in enumerate(METRICS):
        v = flat[:, j]
        cols[m] = pa.array(v, pa.float32(), mask=~np.isfinite(v))
    cols["N"] = rep([int(r["N"]) for r in recs], pa.int32())
    cols["grid_h"] = rep([int(r["grid"][0]) for r in recs], pa.int32())
    cols["grid_w"] = rep([int(r["grid"][1]) for r in recs], pa.int32())
    sizes = [r.get("image_size") or (None, None) for r in recs]
    cols["image_width"] = rep([s[0] for s in sizes], pa.int32())
    cols["image_height"] = rep([s[1] for s in sizes], pa.int32())
    cols["mask"] = rep([r["mask"] for r in recs], pa.string())
    cols["mask_tokens"] = rep([int(r["mask_tokens"]) for r in recs], pa.int32())
    cols["model"] = rep([model] * n, pa.string())
    types = {"bool": pa.bool_(), "int64": pa.int64(), "float64": pa.float64(), "string": pa.string(),
             "json": pa.string()}
    for col, (k, kind) in fcols.items():
        cols[col] = rep([_field_value(r.get("fields", {}).get(k), kind) for r in recs], types[kind])
    return pa.table(cols)


def write_parquet(out_dir: str, meta: dict, records: list, head: np.ndarray, layer: np.ndarray) -> dict:
    """Write ``layers.parquet`` and ``heads.parquet`` (see the module doc); returns their
    paths. ``records`` are the merged sample records in row order; ``head (n, 6, L, H)``
    and ``layer (n, 6, L)`` the merged arrays."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is in requirements.txt
        from ..clitools import logger

        logger.warning("pyarrow is not installed: layers.parquet and heads.parquet were not written "
                       "(pip install pyarrow)")
        return {}
    L = int(meta["L"])
    names = meta.get("layers") or list(range(L))
    model = str(meta.get("model"))
    fcols = field_columns(records)
    paths = {}
    for name, arr, per_head in (("layers", layer, False), ("heads", head, True)):
        path = os.path.join(out_dir, f"{name}.parquet")
        tmp = path + ".tmp"
        writer = None
        try:
            starts = range(0, len(records), _CHUNK) if len(records) else [0]
            for a in starts:
                t = _table(pa, records[a: a + _CHUNK], arr[a: a + _CHUNK], names, fcols, model, per_head)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, t.schema, compression="zstd")
                writer.write_table(t)
        finally:
            if writer is not None:
                writer.close()
        os.replace(tmp, path)
        paths[f"{name}_parquet"] = path
    return paths


__all__ = ["write_parquet", "field_columns", "BASE_COLUMNS"]
