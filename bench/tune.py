"""Choose the Triton attention tiles: from timings on a GPU, or from compile statistics.

The library never tunes inside a call: every launch takes its tile from the static table
of ``vgkernels/triton/tiles.py``, or from the file this script writes for a device.

    python bench/tune.py                    # on a GPU: time every tile of the table per key,
                                            # write the fastest to the device's tile file
    python bench/tune.py --dry-run          # list the keys, tiles and shapes it would time
    python bench/tune.py --only d128/16bit --max-seconds 180 --out tiles.json
    python bench/tune.py --compile-stats            # no GPU needed: registers, spills and
    python bench/tune.py --compile-stats --write    # shared memory of every candidate for
                                                    # sm_80/sm_90; --write regenerates TABLE

The tile file (default: ``vgkernels.triton.tiles.override_path(<device name>)``, i.e.
``$VGKERNELS_TILES`` or ``~/.cache/vgkernels/tiles-<device>.json``) records the device
name and the Triton version; the library ignores it on another device or Triton. It keeps
every measured time, so a run can be compared with the table's default. Without a GPU
(and without ``--dry-run`` or ``--compile-stats``) the script says so and exits with
status 2.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Compiling for a target, or timing, needs Triton's real compiler, not its interpreter
# (the variable is read when the kernels are imported, just below).
if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from vgkernels.triton import tiles  # noqa: E402

DTYPES = {"16bit": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (64, 128, 256)


def problem(kernel: str, d: int, dtype_class: str, knockout: bool) -> dict:
    """The shape a key is timed on: a 7B-like prefill (attn) or decode step (attn_split)."""
    if kernel == "attn":
        shape = dict(B=4, Sq=2048, Sk=2048, Hq=32, Hkv=8, D=d)
    else:
        shape = dict(B=8, Sq=1, Sk=4096, Hq=32, Hkv=8, D=d)
    return dict(shape, dtype=dtype_class, knockout=knockout, capture=knockout, padding=knockout, N=576)


def table_keys(arch: str, only: str | None) -> list[str]:
    keys = tiles.all_keys(arch=arch)
    if only:
        keys = [k for k in keys if all(part in k for part in only.split(","))]
    return keys


def parse_key(key: str):
    kernel, arch, d, dt, feat = key.split("/")
    return kernel, arch, int(d[1:]), dt, feat == "ko"


def build(p: dict, device):
    from vgkernels import Capture, Knockout
    from vgkernels._validate import check_attention

    g = torch.Generator(device="cpu").manual_seed(0)
    dt = DTYPES[p["dtype"]]
    B, Sq, Sk, Hq, Hkv, D, N = (p[x] for x in ("B", "Sq", "Sk", "Hq", "Hkv", "D", "N"))
    q = torch.randn(B, Sq, Hq, D, generator=g).to(device, dt)
    k = torch.randn(B, Sk, Hkv, D, generator=g).to(device, dt)
    v = torch.randn(B, Sk, Hkv, D, generator=g).to(device, dt)
    kpm = ko = cap = None
    if p["padding"]:
        kpm = torch.ones(B, Sk, dtype=torch.bool)
        kpm[-1, : Sk // 10] = False
        kpm = kpm.to(device)
    if p["knockout"]:
        ks = torch.full((B,), min(35, Sk - N))
        keep = (torch.rand(B, N, generator=g) > 0.5).to(device)
        ko = Knockout(ks + N, torch.full((B,), Sk), ks, keep, "renorm")
        cap = Capture(torch.full((B,), Sk - 1), ks, N)
    return check_attention(q, k, v, True, None, kpm, ko, cap)  # validated once, outside the timing


def tune(args) -> int:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    out_path = args.out or tiles.override_path(name)
    run_tuning(dev, name, tiles.arch_class(dev), out_path, only=args.only, max_seconds=args.max_seconds)
    return 0


def _do_bench(fn) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=50)


def run_tuning(dev, name: str, arch: str, out_path: str, *, only=None, max_seconds=0.0, timer=_do_bench) -> dict:
    """Time every tile of ``arch``'s table keys on ``dev`` with ``timer(fn) -> ms`` and write
    the tile file the library reads (:func:`vgkernels.triton.tiles.read_override`)."""
    import triton

    from vgkernels.triton import flash

    result = {"format": 1, "device": name, "arch": arch, "triton": triton.__version__, "torch": torch.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "tiles": {}, "timings": {}}
    if dev.type == "cuda":
        result["capability"] = list(torch.cuda.get_device_capability(dev))
    t_end = time.time() + max_seconds if max_seconds else None
    for key in table_keys(arch, only):
        kernel, _, d, dtc, ko = parse_key(key)
        p = problem(kernel, d, dtc, ko)
        a = build(p, dev)
        times = {}
        for tile in tiles.configs(kernel, arch, d, DTYPES[dtc], ko):
            if t_end is not None and time.time() > t_end:
                print(f"time limit reached before {key} {_tile_str(tile)}; writing what was measured", flush=True)
                break

            def call(tile=tile):
                flash.attention(a.q, a.k, a.v, True, a.scale, a.key_padding_mask, a.knockout, a.capture, True,
                                tile=tile)

            try:
                ms = float(timer(call))
            except Exception as e:  # a tile that does not compile or launch here: recorded, not chosen
                times[_tile_str(tile)] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                print(f"{key:34s} {_tile_str(tile):24s} failed: {type(e).__name__}", flush=True)
                continue
            times[_tile_str(tile)] = round(ms, 5)
            print(f"{key:34s} {_tile_str(tile):24s} {ms:9.4f} ms", flush=True)
        measured = {t: ms for t, ms in times.items() if isinstance(ms, float)}
        if measured:
            best = min(measured, key=measured.get)
            result["tiles"][key] = list(_tile_of(best))
            result["timings"][key] = {"shape": p, "ms": times, "best": best,
                                      "default": _tile_str(tiles.configs(kernel, arch, d, DTYPES[dtc], ko)[0])}
        if t_end is not None and time.time() > t_end:
            break
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out_path)
    print(f"wrote {len(result['tiles'])} tuned keys to {out_path}")
    return result


def dry_run(args) -> int:
    archs = [args.arch] if args.arch else list(tiles.ARCHS)
    n = 0
    for arch in archs:
        for key in table_keys(arch, args.only):
            kernel, _, d, dtc, ko = parse_key(key)
            p = problem(kernel, d, dtc, ko)
            shape = ", ".join(f"{k}={v}" for k, v in p.items())
            for tile in tiles.configs(kernel, arch, d, DTYPES[dtc], ko):
                print(f"{key:34s} {_tile_str(tile):24s} {shape}")
                n += 1
    print(f"dry run: {n} (key, tile) timings; on a GPU only the keys of its own architecture run")
    return 0


# ------------------------------------------------------------------ compile statistics

def candidates(kernel: str, arch: str, d: int, dtc: str) -> list:
    base = tiles.CANDIDATES[(kernel, d, dtc)]
    if arch != "sm90":
        return list(base)
    out = []
    for t in base:  # the TMA variant right after its pointer twin
        out += [t, t._replace(tma=True)]
    return out


def compile_stats(args) -> int:
    from vgkernels.triton._compile import attention_stats

    stats = {}
    for kernel in tiles.KERNELS:
        for d in HEAD_DIMS:
            for dtc in ("16bit", "fp32"):
                for ko in (False, True):
                    for arch, cc in (("sm80", 80), ("sm90", 90)):
                        if args.only and not all(part in f"{kernel}/{arch}/d{d}/{dtc}/{'ko' if ko else 'plain'}"
                                                 for part in args.only.split(",")):
                            continue
                        for tile in candidates(kernel, arch, d, dtc):
                            k = f"{kernel}/{arch}/d{d}/{dtc}/{'ko' if ko else 'plain'}|{_tile_str(tile)}"
                            try:
                                s = attention_stats(kernel, cc, d, "bf16" if dtc == "16bit" else "fp32", ko, tile)
                            except Exception as e:  # recorded: such a tile never enters the table
                                s = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                            stats[k] = s
                            print(k, json.dumps(s), flush=True)
    if args.stats_out:
        with open(args.stats_out, "w") as f:
            json.dump(stats, f, indent=1)
    if args.write:
        write_table(stats)
    return 0


def choose(stats: dict, kernel: str, arch: str, d: int, dtc: str, ko: bool) -> list:
    """The table entry of one key from compile statistics (see vgkernels/triton/tiles.py)."""
    src = "sm80" if arch == "sm86" else arch
    feat = "ko" if ko else "plain"
    rows = []
    for tile in candidates(kernel, src, d, dtc):
        s = stats.get(f"{kernel}/{src}/d{d}/{dtc}/{feat}|{_tile_str(tile)}")
        if s is None or "error" in s or s["shared"] > tiles.SMEM_LIMIT[arch]:
            continue
        rows.append((tile, s))
    if not rows:
        raise RuntimeError(f"no candidate compiles and fits for {kernel}/{arch}/d{d}/{dtc}/{feat}")
    spill = {tuple(t): s["spill_stores"] + s["spill_loads"] for t, s in rows}
    clean = [(t, s) for t, s in rows if spill[tuple(t)] == 0]
    if not clean:  # everything spills: keep the least-spilling tile only
        return [min(rows, key=lambda r: spill[tuple(r[0])])]
    # Candidate order, except that on sm_90 the TMA variant of a tile goes first where it
    # needs no more registers than its pointer twin.
    ordered = []
    for base in tiles.CANDIDATES[(kernel, d, dtc)]:
        pair = [r for r in clean if tuple(r[0][:4]) == tuple(base[:4])]
        ordered += sorted(pair, key=lambda r: (r[1]["regs"], not r[0].tma))
    # Tiles that spill a few bytes may still be fastest: after the clean ones, for the tuner.
    ordered += [(t, s) for t, s in rows if 0 < spill[tuple(t)] <= LIGHT_SPILL]
    # A short list: the GPU tests run every entry, and tuning times every entry.
    return ordered[:TABLE_LENGTH[dtc]]


LIGHT_SPILL = 64


TABLE_LENGTH = {"16bit": 4, "fp32": 2}


def write_table(stats: dict) -> None:
    lines = ["TABLE: dict = {"]
    for kernel in tiles.KERNELS:
        for arch in tiles.ARCHS:
            for d in HEAD_DIMS:
                for dtc in ("16bit", "fp32"):
                    for ko in (False, True):
                        key = f"{kernel}/{arch}/d{d}/{dtc}/{'ko' if ko else 'plain'}"
                        lines.append(f'    "{key}": [')
                        for t, s in choose(stats, kernel, arch, d, dtc, ko):
                            spill = s["spill_stores"] + s["spill_loads"]
                            lines.append(f"        ({t.block_m}, {t.block_n}, {t.num_warps}, {t.num_stages}, {t.tma}),"
                                         f"  # {s['regs']} regs, {spill} B spilled, {s['shared'] // 1024} KiB shared")
                        lines.append("    ],")
    lines.append("}")
    path = os.path.join(ROOT, "vgkernels", "triton", "tiles.py")
    src = open(path).read()
    begin = src.index("TABLE: dict = {")
    end = src.index("# ---- end of generated table ----")
    src = src[:begin] + "\n".join(lines) + "\n" + src[end:]
    with open(path, "w") as f:
        f.write(src)
    print(f"rewrote the table in {path}")


def _tile_str(t) -> str:
    return f"{t[0]}x{t[1]}/w{t[2]}/s{t[3]}" + ("/tma" if t[4] else "")


def _tile_of(s: str) -> tiles.Tile:
    m = re.fullmatch(r"(\d+)x(\d+)/w(\d+)/s(\d+)(/tma)?", s)
    return tiles.Tile(int(m[1]), int(m[2]), int(m[3]), int(m[4]), bool(m[5]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list what would be timed; no GPU needed")
    ap.add_argument("--compile-stats", action="store_true", help="compile every candidate for sm_80/sm_90 (no GPU)")
    ap.add_argument("--write", action="store_true", help="with --compile-stats: regenerate the static table")
    ap.add_argument("--stats-out", help="with --compile-stats: also write the statistics to this JSON file")
    ap.add_argument("--only", help="comma-separated substrings a key must contain, e.g. 'attn/,d128,16bit'")
    ap.add_argument("--arch", choices=tiles.ARCHS, help="--dry-run: one architecture's keys only")
    ap.add_argument("--out", help="tile file to write (default: the device's path the library reads)")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop timing after this long, keep what was measured")
    args = ap.parse_args(argv)
    if args.write and not args.compile_stats:
        ap.error("--write goes with --compile-stats")
    if args.compile_stats:
        return compile_stats(args)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("bench/tune.py times tiles on a CUDA GPU and none is available here; use --dry-run to list what "
              "it would time, or --compile-stats for register and spill counts", file=sys.stderr)
        return 2
    return tune(args)


if __name__ == "__main__":
    sys.exit(main())
