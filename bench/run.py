#!/usr/bin/env python
"""Run every ``bench/bench_*.py`` and write ``bench/results/<device>-<date>.{json,md}``.

    python bench/run.py                 # full shape set on a GPU, reduced set on CPU
    python bench/run.py --small         # reduced shapes on a GPU too (smoke run)
    python bench/run.py -- -k metrics   # anything after -- goes to pytest

Rows come from pytest-benchmark's JSON: each benchmark's ``extra_info`` (see
``bench/conftest.py``) names its provider, comparison group and baseline. In every group
the ratio column is ``baseline median / row median`` — throughput relative to the
group's baseline (plain SDPA for attention) measured in the same run; > 1 is faster.
A run without CUDA is labelled a CPU run: its numbers say nothing about the GPU targets.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        info.update(device_name=name, device=_slug(name), cpu_run=False,
                    cuda=torch.version.cuda, gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        name = _cpu_name()
        info.update(device_name=name, device="cpu-" + _slug(name), cpu_run=True, cpu_threads=torch.get_num_threads())
    return info


def run_pytest(extra: list[str], small: bool) -> tuple[dict, list[dict], int]:
    with tempfile.TemporaryDirectory() as tmp:
        bench_json = Path(tmp) / "bench.json"
        skips = Path(tmp) / "skips.jsonl"
        env = dict(os.environ, BENCH_SKIPS=str(skips))
        if small:
            env["BENCH_SMALL"] = "1"
        # The library tests switch the Triton interpreter on; a benchmark never should.
        env.pop("TRITON_INTERPRET", None)
        cmd = [
            sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider",
            "-o", "addopts=", "-o", "python_files=bench_*.py", "--rootdir", str(ROOT),
            "--benchmark-enable", f"--benchmark-json={bench_json}", "--benchmark-columns=median,rounds",
            *extra,
        ]
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        data = json.loads(bench_json.read_text()) if bench_json.exists() else {"benchmarks": []}
        skipped = [json.loads(line) for line in skips.read_text().splitlines()] if skips.exists() else []
    return data, skipped, rc


def build_rows(data: dict) -> list[dict]:
    rows = []
    for bm in data.get("benchmarks", []):
        info = bm.get("extra_info", {})
        if "provider" not in info:  # a benchmark that does not use the measure fixture
            info = dict(info, provider=bm["name"], group=bm.get("group") or bm["fullname"].split("::")[0],
                        shape="", median_ms=bm["stats"]["median"] * 1e3, baseline=False)
        rows.append({
            "name": bm["fullname"], "group": info["group"], "provider": info["provider"], "shape": info.get("shape", ""),
            "median_ms": info.get("median_ms", bm["stats"]["median"] * 1e3),
            "tflops": info.get("tflops"), "gbps": info.get("gbps"), "peak_mib": info.get("peak_mib"),
            "baseline": bool(info.get("baseline")), "note": info.get("note"), "timer": info.get("timer"),
            "rounds": bm["stats"].get("rounds"),
        })
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    for group_rows in by_group.values():
        base = next((r for r in group_rows if r["baseline"]), None)
        for r in group_rows:
            r["baseline_provider"] = base["provider"] if base else None
            r["ratio_to_baseline"] = (base["median_ms"] / r["median_ms"]) if base and r["median_ms"] else None
    return rows


def _find(rows, group, provider):
    return next((r for r in rows if r["group"] == group and r["provider"] == provider), None)


def targets(rows: list[dict]) -> list[dict]:
    """Issue 3's targets, from whatever rows this run has (stated for an H100 in bf16)."""
    out = []
    for group in sorted({r["group"] for r in rows if r["group"].startswith("attention")}):
        m = re.search(r"S=(\d+)", group)
        S = int(m.group(1)) if m else 0
        fused = _find(rows, group, "vgkernels-triton+ko+cap")
        if fused is None:
            continue

        def ratio(other, fused=fused):
            return (other["median_ms"] / fused["median_ms"]) if other else None

        checks = [("fused ko+cap vs SDPA (throughput)", ratio(_find(rows, group, "sdpa")), 0.9, S >= 1200),
                  ("fused ko+cap vs FlexAttention", ratio(_find(rows, group, "flex")), 1.2, True),
                  ("fused ko+cap vs SDPA dense mask", ratio(_find(rows, group, "sdpa-densemask")), 3.0, True)]
        ko = _find(rows, group, "vgkernels-triton+ko")
        for name, value, need, applies in checks:
            if value is not None and applies:
                out.append({"group": group, "target": f"{name} >= {need}x", "value": round(value, 3),
                            "met": value >= need})
        if ko:
            overhead = fused["median_ms"] / ko["median_ms"] - 1.0
            out.append({"group": group, "target": "capture overhead <= 3%", "value": round(100 * overhead, 2),
                        "met": overhead <= 0.03})
    for group in sorted({r["group"] for r in rows if r["group"].startswith("metrics")}):
        kern, copy = _find(rows, group, "vgkernels-triton"), _find(rows, group, "copy")
        if kern and copy and kern["gbps"] and copy["gbps"]:
            frac = kern["gbps"] / copy["gbps"]
            out.append({"group": group, "target": "metrics >= 60% of measured bandwidth (copy)",
                        "value": round(100 * frac, 1), "met": frac >= 0.6})
    return out


def _fmt(x, nd=3):
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        if x == 0:
            return "0"
        return f"{x:.{nd}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def markdown(meta: dict, rows: list[dict], tgt: list[dict], skipped: list[dict]) -> str:
    lines = [f"# Microbenchmarks — {meta['device_name']} — {meta['date']}", ""]
    if meta["cpu_run"]:
        lines += ["**CPU run.** No GPU: reduced shapes, float32, Triton providers skipped (the interpreter is not a",
                  "speed measurement). These numbers compare CPU torch paths only and say nothing about the GPU targets.",
                  ""]
    lines += [f"torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}; "
              f"timer: {rows[0]['timer'] if rows else '–'}; exit status of pytest: {meta['pytest_rc']}.", "",
              "`× base` = baseline median / row median (throughput relative to the group's baseline, same run).", ""]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for group, grs in groups.items():
        base = grs[0]["baseline_provider"]
        lines += [f"## {group}", "", f"baseline: `{base}`" if base else "no baseline in this group", "",
                  "| provider | shape | median ms | TFLOP/s | GB/s | peak MiB | × base | note |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in grs:
            lines.append(f"| {r['provider']} | {r['shape']} | {_fmt(r['median_ms'])} | {_fmt(r['tflops'])} | "
                         f"{_fmt(r['gbps'])} | {_fmt(r['peak_mib'])} | {_fmt(r['ratio_to_baseline'])} | "
                         f"{r['note'] or ''} |")
        lines.append("")
    lines += ["## Targets (issue 3; stated for an H100 in bf16)", ""]
    if tgt:
        lines += ["| group | target | value | met |", "|---|---|---:|---|"]
        lines += [f"| {t['group']} | {t['target']} | {_fmt(t['value'])} | {_fmt(t['met'])} |" for t in tgt]
    else:
        lines.append("Not measured in this run (no Triton rows: " +
                     ("no GPU" if meta["cpu_run"] else "see skipped") + ").")
    lines.append("")
    if skipped:
        lines += ["## Skipped", "", "| benchmark | reason |", "|---|---|"]
        lines += [f"| `{s['test'].split('::')[-1]}` | {s['reason']} |" for s in skipped]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="reduced shape set (default on CPU)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    args = p.parse_args(argv)

    meta = device_info()
    meta["date"] = _dt.date.today().isoformat()
    data, skipped, rc = run_pytest(args.pytest_args, args.small)
    meta["pytest_rc"] = rc
    meta["shape_set"] = "small" if (args.small or meta["cpu_run"]) else "full"
    rows = build_rows(data)
    tgt = targets(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{meta['device']}-{meta['date']}"
    record = {"meta": meta, "rows": rows, "targets": tgt, "skipped": skipped,
              "machine_info": data.get("machine_info"), "commit_info": data.get("commit_info")}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, rows, tgt, skipped))
    print(f"wrote {stem}.json and {stem}.md ({len(rows)} rows, {len(skipped)} skipped)")
    return 0 if rc in (0, 5) and rows else (rc or 1)


if __name__ == "__main__":
    sys.exit(main())
