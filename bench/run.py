#!/usr/bin/env python
"""Run the benchmarks and write ``bench/results/<device>-<date>.{json,md}``.

    python bench/run.py                        # full shape set on a GPU, CPU set without one
    python bench/run.py --small                # reduced shape set on a GPU (what gpu-check runs)
    python bench/run.py --files bench_model.py # some files only
    python bench/run.py --append ...           # merge into today's results file instead of replacing it
    python bench/run.py --time-limit 300 ...   # stop pytest at 300 s, keeping the rows it finished
    python bench/run.py -- -k metrics          # anything after -- goes to pytest

Rows: every benchmark that uses ``bench/conftest.py``'s ``measure`` streams its row to a
JSON-lines file the moment it is measured, so a run stopped at its time limit (SIGINT,
then SIGKILL to the process group) keeps what it finished. In every group the ratio column
is ``baseline median / row median``: throughput relative to the group's baseline measured
in the same run; > 1 is faster. Skipped and failed benchmarks are listed with their reason.

Targets (issue 14, and issue 10's patched-model ratios) are evaluated from the rows: each
one is listed with its measured value and ``pass`` / ``fail``, or ``unmeasured`` with the
reason. A run without CUDA is labelled a CPU run; targets stated for a GPU are then
reported with their CPU value for reference only.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
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
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        cap = torch.cuda.get_device_capability(0)
        info.update(device_name=name, device=_slug(name), cpu_run=False, cuda=torch.version.cuda,
                    capability=f"{cap[0]}.{cap[1]}",
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        name = _cpu_name()
        info.update(device_name=name, device="cpu-" + _slug(name), cpu_run=True, cpu_threads=torch.get_num_threads())
    return info


# ----------------------------------------------------------------------------- running


def run_pytest(targets: list, extra: list, small: bool, time_limit: float | None) -> dict:
    """Run pytest over ``targets``; returns rows, skips, pytest-benchmark data, exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        bench_json = Path(tmp) / "bench.json"
        rows_path, skips_path = Path(tmp) / "rows.jsonl", Path(tmp) / "skips.jsonl"
        env = dict(os.environ, BENCH_SKIPS=str(skips_path), BENCH_ROWS=str(rows_path), PYTHONUNBUFFERED="1")
        if small:
            env["BENCH_SMALL"] = "1"
        # The library tests switch the Triton interpreter on; a benchmark never should.
        env.pop("TRITON_INTERPRET", None)
        cmd = [
            sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider",
            "-o", "addopts=", "-o", "python_files=bench_*.py", "--rootdir", str(ROOT),
            "--benchmark-enable", f"--benchmark-json={bench_json}", "--benchmark-columns=median,rounds",
            *extra,
        ]
        print("+", " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            print(f"run.py: time limit of {time_limit:.0f} s reached: interrupting pytest (rows so far are kept)",
                  flush=True)
            rc = _stop_group(proc)
        data = {"benchmarks": []}
        if bench_json.exists():
            try:
                data = json.loads(bench_json.read_text())
            except json.JSONDecodeError:  # interrupted while writing
                pass
        rows = _read_jsonl(rows_path)
        skipped = _read_jsonl(skips_path)
    return {"rows": rows, "skipped": skipped, "data": data, "rc": rc, "timed_out": timed_out}


def _stop_group(proc, grace: float = 20.0) -> int:
    """SIGINT the process group (pytest finishes the test in flight and exits), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def _read_jsonl(path: Path) -> list:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a kill
            pass
    return out


def build_rows(raw_rows: list, data: dict | None = None) -> list[dict]:
    """Rows from the streamed records (the last record of a benchmark wins), plus any
    benchmark of pytest-benchmark's JSON that did not stream one; ratios per group."""
    latest: dict[str, dict] = {}
    for r in raw_rows:
        latest[r["name"]] = r
    for bm in (data or {}).get("benchmarks", []):
        if bm["fullname"] in latest:
            continue
        info = bm.get("extra_info", {})
        latest[bm["fullname"]] = dict(info, name=bm["fullname"], provider=info.get("provider", bm["name"]),
                                      group=info.get("group") or bm.get("group") or bm["fullname"].split("::")[0],
                                      median_ms=info.get("median_ms", bm["stats"]["median"] * 1e3),
                                      rounds=bm["stats"].get("rounds"))
    rows = []
    for r in latest.values():
        rows.append({
            "name": r["name"], "group": r["group"], "provider": r["provider"], "shape": r.get("shape", ""),
            "median_ms": r.get("median_ms"), "tflops": r.get("tflops"), "gbps": r.get("gbps"),
            "peak_mib": r.get("peak_mib"), "baseline": bool(r.get("baseline")), "note": r.get("note"),
            "timer": r.get("timer"), "level": r.get("level"), "extra": r.get("extra"), "rounds": r.get("rounds"),
        })
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    for group_rows in by_group.values():
        base = next((r for r in group_rows if r["baseline"]), None)
        for r in group_rows:
            r["baseline_provider"] = base["provider"] if base else None
            ok = base and base.get("median_ms") and r.get("median_ms")
            r["ratio_to_baseline"] = (base["median_ms"] / r["median_ms"]) if ok else None
    return rows


def merge(old: dict, rows: list[dict], skipped: list[dict]) -> tuple[list[dict], list[dict]]:
    """``--append``: today's earlier rows, minus those measured again, plus the new ones."""
    names = {r["name"] for r in rows}
    keep = [r for r in old.get("rows", []) if r["name"] not in names]
    tests = {s["test"] for s in skipped}
    old_skips = [s for s in old.get("skipped", []) if s["test"] not in names and s["test"] not in tests]
    new_skips = [s for s in skipped if s["test"] not in {r["name"] for r in keep}]
    return with_ratios(keep + rows), old_skips + new_skips


# ----------------------------------------------------------------------------- targets

GPU_ONLY = "CPU run: the target is stated for an H100/H200 in bfloat16; the CPU value is shown for reference only"


def _find(rows, group, provider):
    return next((r for r in rows if r["group"] == group and r["provider"] == provider), None)


def _shape_id(group: str) -> str:
    """The attention test-id prefix of an attention group."""
    m = re.search(r"B=(\d+) S=(\d+) Hq=(\d+) Hkv=(\d+)", group)
    return "test_attention[" + ("B{}-S{}-Hq{}-Hkv{}".format(*m.groups()) if m else group)


def cost_ratio(row, base):
    """``row / base`` time: the paired ratio the row recorded (alternating calls with the
    baseline, robust to load that changed between rows) when it has one, else the ratio
    of the two medians. Returns (ratio, how)."""
    paired = (row.get("extra") or {}).get("paired")
    if paired and paired.get("ratio"):
        return paired["ratio"], f"median of {paired['pairs']} alternating pairs"
    return row["median_ms"] / base["median_ms"], "ratio of medians"


def _why(skipped, key: str, provider: str) -> str:
    """Why ``provider`` has no row for the case ``key`` (a ``test_name[case`` fragment)."""
    for s in skipped:
        t = s["test"]
        if key in t and (t.endswith(f"-{provider}]") or t.endswith(f"[{provider}]") or f"[{provider}-" in t):
            return f"{provider}: {s.get('outcome', 'skipped')}: {s['reason']}"
    return f"no {provider} row in this run"


def _entry(target, group, value, unit, met, *, cpu_run, gpu_only, reason=None):
    e = {"target": target, "group": group, "value": None if value is None else round(value, 4), "unit": unit}
    if value is None:
        e.update(status="unmeasured", reason=reason or "not measured")
    elif cpu_run and gpu_only:
        e.update(status="unmeasured", reason=GPU_ONLY)
    else:
        e.update(status="pass" if met else "fail", reason=reason)
    return e


def targets(rows: list[dict], skipped: list[dict], cpu_run: bool) -> list[dict]:
    """Every target of issue 14 (and issue 10's patched-model ratios), from this run's rows."""
    out: list[dict] = []
    E = lambda *a, gpu_only=True, **k: out.append(_entry(*a, cpu_run=cpu_run, gpu_only=gpu_only, **k))  # noqa: E731
    groups = lambda prefix: sorted({r["group"] for r in rows if r["group"].startswith(prefix)})  # noqa: E731

    # --- kernel-level attention
    att = groups("attention ")
    FUSED = "vgkernels-triton+ko+cap"
    specs = [("fused knockout+capture >= 0.9x SDPA throughput at S >= 1200", "sdpa", 0.9, lambda S: S >= 1200),
             ("fused knockout+capture >= 1.2x compiled FlexAttention (same mask)", "flex", 1.2, lambda S: True),
             ("fused knockout+capture >= 3x transformers' sdpa with the dense mask", "sdpa-densemask-hf", 3.0,
              lambda S: True)]
    for text, other_p, need, applies in specs:
        pending = []
        for g in att:
            S = int(re.search(r"S=(\d+)", g).group(1))
            if not applies(S):
                continue
            fused, other = _find(rows, g, FUSED), _find(rows, g, other_p)
            if fused is None or other is None:
                missing = FUSED if fused is None else other_p
                pending.append((g, _why(skipped, _shape_id(g), missing)))
                continue
            if other_p == "flex" and not ((other.get("extra") or {}).get("compile") or {}).get("verified"):
                pending.append((g, "the flex row was not verified to run compiled"))
                continue
            E(text, g, other["median_ms"] / fused["median_ms"], "x", other["median_ms"] / fused["median_ms"] >= need)
        if not att:
            pending.append(("attention", "no attention rows in this run"))
        out.extend(_collapse(text, pending))
    pending = []
    for g in att:
        fused, ko = _find(rows, g, FUSED), _find(rows, g, "vgkernels-triton+ko")
        if fused and ko:
            over = 100 * (fused["median_ms"] / ko["median_ms"] - 1)
            E("capture adds <= 3% over knockout alone", g, over, "%", over <= 3.0)
        else:
            pending.append((g, _why(skipped, _shape_id(g), FUSED if fused is None else "vgkernels-triton+ko")))
    if not att:
        pending.append(("attention", "no attention rows in this run"))
    out.extend(_collapse("capture adds <= 3% over knockout alone", pending))
    text = "stretch: fused knockout+capture >= 450 TFLOP/s at S = 8192"
    pending = []
    for g in [g for g in att if "S=8192" in g]:
        fused = _find(rows, g, FUSED)
        if fused and fused.get("tflops"):
            E(text, g, fused["tflops"], "TFLOP/s", fused["tflops"] >= 450)
        else:
            pending.append((g, _why(skipped, _shape_id(g), FUSED)))
    if not [g for g in att if "S=8192" in g]:
        pending.append(("attention", "no S = 8192 shape in this run's shape set"))
    out.extend(_collapse(text, pending))

    # --- metrics vs copy bandwidth
    text = "metrics kernel >= 60% of the measured copy bandwidth"
    device_copy = next((r for r in rows if r["group"].startswith("bandwidth") and r["provider"] == "copy"), None)
    pending = []
    met_groups = groups("metrics ")
    for g in met_groups:
        kern, copy = _find(rows, g, "vgkernels-triton"), _find(rows, g, "copy")
        if kern and kern.get("gbps") and copy and copy.get("gbps"):
            frac = kern["gbps"] / copy["gbps"]
            extra = (f"{100 * kern['gbps'] / device_copy['gbps']:.0f}% of the device copy bandwidth "
                     f"({device_copy['gbps']:.0f} GB/s)") if device_copy and device_copy.get("gbps") else None
            E(text + " (same-size copy)", g, 100 * frac, "%", frac >= 0.6, reason=extra)
        else:
            key = "test_metrics[" + g.removeprefix("metrics ")
            pending.append((g, _why(skipped, key, "vgkernels-triton") if not kern else "no copy row in this group"))
    if not met_groups:
        pending.append(("metrics", "no metrics rows in this run"))
    out.extend(_collapse(text + " (same-size copy)", pending))

    # --- patched model (issue 10): cost ratios, composed / default execution
    fwd = groups("model forward ")
    for what, prefix, gpu_need, cpu_need in (("capture='all' forward", "capture-all", 1.03, 1.10),
                                            ("one-layer knockout forward", "knockout-L", 1.05, 1.20)):
        need = cpu_need if cpu_run else gpu_need
        text = f"{what} <= {need:.2f}x the unpatched forward ({'CPU' if cpu_run else 'GPU'} target)"
        pending = []
        for g in fwd:
            base = _find(rows, g, "unpatched")
            cands = [r for r in rows if r["group"] == g and r["provider"].startswith(prefix)
                     and "patch-per-call" not in r["provider"] and not r["provider"].endswith("/fused")]
            row = cands[0] if cands else None
            if base and row:
                ratio, how = cost_ratio(row, base)
                E(text, g, ratio, "x", ratio <= need, gpu_only=False, reason=f"row {row['provider']}, {how}")
            else:
                pending.append((g, f"no {'unpatched' if not base else prefix} row in this group"))
        if not fwd:
            pending.append(("model forward", _why_file(skipped, "test_model_forward")))
        out.extend(_collapse(text, pending))

    # --- VGRefine and sweep: a cost ratio against the group's baseline
    for text, prefix, base_p, row_p, test, value, met in (
            ("VGRefine <= 1.25x plain generate (8 new tokens)", "refine ", "plain-generate", "vgrefine",
             "test_refine", lambda r: r, lambda v: v <= 1.25),
            ("sweep >= 10x the output_attentions loop (samples/s)", "sweep ", "output_attentions-loop", "sweep",
             "test_sweep", lambda r: 1.0 / r, lambda v: v >= 10)):
        pending = []
        for g in groups(prefix):
            base, row = _find(rows, g, base_p), _find(rows, g, row_p)
            if base and row:
                ratio, how = cost_ratio(row, base)
                E(text, g, value(ratio), "x", met(value(ratio)), reason=how)
            else:
                pending.append((g, _why(skipped, f"{test}[", row_p if base else base_p)))
        if not groups(prefix):
            pending.append((prefix.strip(), _why_file(skipped, test)))
        out.extend(_collapse(text, pending))
    return out


def _why_file(skipped, test: str) -> str:
    for s in skipped:
        if f"::{test}" in s["test"]:
            return f"{s.get('outcome', 'skipped')}: {s['reason']}"
    return "no such rows in this run"


def _collapse(text: str, pending: list) -> list:
    """One unmeasured entry per distinct reason (groups joined), not one per group."""
    by_reason: dict[str, list] = {}
    for g, why in pending:
        by_reason.setdefault(why, []).append(g)
    return [{"target": text, "group": "; ".join(gs), "value": None, "unit": None, "status": "unmeasured",
             "reason": why} for why, gs in by_reason.items()]


# ----------------------------------------------------------------------------- output


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


def _row_note(r) -> str:
    parts = [r["note"]] if r.get("note") else []
    extra = r.get("extra") or {}
    if extra.get("paired"):
        parts.append(f"paired with the baseline: {extra['paired']['ratio']:.3f}x its time "
                     f"(median of {extra['paired']['pairs']} alternating pairs)")
    if "compile" in extra:
        c = extra["compile"]
        parts.append(f"compile: {c.get('call')} mode={c.get('mode')}; {c.get('verified', 'NOT verified')}")
    return "; ".join(parts)


def status_cell(t) -> str:
    if t["status"] == "pass":
        return "pass"
    if t["status"] == "fail":
        return "**fail**"
    return f"unmeasured: {t['reason']}"


def markdown(meta: dict, rows: list[dict], tgt: list[dict], skipped: list[dict]) -> str:
    lines = [f"# Benchmarks — {meta['device_name']} — {meta['date']}", ""]
    if meta["cpu_run"]:
        lines += ["**CPU run.** No GPU: CPU shape set, float32, Triton providers skipped (the interpreter is not a",
                  "speed measurement), the tiny-but-long LLaVA for model-level rows. These numbers compare CPU paths",
                  "only and say nothing about the GPU targets (issue 10's CPU ratios excepted).", ""]
    status = ", ".join(str(p["rc"]) + (" (time limit)" if p.get("timed_out") else "") for p in meta.get("parts", []))
    lines += [f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta.get('transformers')}, "
              f"python {meta['python']}; shape set: {meta['shape_set']}; pytest exit status: {status or '–'}.",
              "", "`× base` = baseline median / row median (throughput relative to the group's baseline, same run).",
              ""]
    timers = sorted({f"{r.get('level') or 'other'} rows: {r['timer']}" for r in rows if r.get("timer")})
    if timers:
        lines += ["Timers — " + "; ".join(timers) + ".", ""]
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
                         f"{_row_note(r)} |")
        lines.append("")
    lines += ["## Targets (issue 14; patched-model ratios from issue 10)", "",
              "| target | group | value | status |", "|---|---|---:|---|"]
    for t in tgt:
        val = "–" if t["value"] is None else f"{_fmt(float(t['value']))} {t['unit']}"
        cell = status_cell(t)
        if t["status"] in ("pass", "fail") and t.get("reason"):
            cell += f" ({t['reason']})"
        lines.append(f"| {t['target']} | {t['group']} | {val} | {cell} |")
    lines.append("")
    if skipped:
        lines += ["## Skipped or failed", "", "| benchmark | outcome | reason |", "|---|---|---|"]
        lines += [f"| `{s['test'].split('::')[-1]}` | {s.get('outcome', 'skipped')} | {s['reason']} |" for s in skipped]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="reduced shape set on a GPU (the CPU set without one)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument("--files", nargs="+", default=None, help="bench files to run (default: every bench/bench_*.py)")
    p.add_argument("--append", action="store_true", help="merge into today's results file of this device")
    p.add_argument("--time-limit", type=float, default=None, help="seconds before pytest is interrupted")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    args = p.parse_args(argv)

    meta = device_info()
    meta["date"] = _dt.date.today().isoformat()
    files = [str(HERE / Path(f).name) for f in args.files] if args.files else [str(HERE)]
    t0 = time.perf_counter()
    res = run_pytest(files, args.pytest_args, args.small, args.time_limit)
    part = {"files": [Path(f).name for f in files], "args": args.pytest_args, "rc": res["rc"],
            "timed_out": res["timed_out"], "seconds": round(time.perf_counter() - t0, 1)}
    meta["shape_set"] = "cpu" if meta["cpu_run"] else ("reduced" if args.small else "full")
    rows, skipped = build_rows(res["rows"], res["data"]), res["skipped"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{meta['device']}-{meta['date']}"
    parts = [part]
    if args.append and stem.with_suffix(".json").exists():
        old = json.loads(stem.with_suffix(".json").read_text())
        rows, skipped = merge(old, rows, skipped)
        parts = old.get("meta", {}).get("parts", []) + parts
    meta["parts"] = parts
    meta["pytest_rc"] = res["rc"]
    tgt = targets(rows, skipped, meta["cpu_run"])
    record = {"meta": meta, "rows": rows, "targets": tgt, "skipped": skipped,
              "machine_info": res["data"].get("machine_info"), "commit_info": res["data"].get("commit_info")}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, rows, tgt, skipped))
    print(f"wrote {stem}.json and {stem}.md ({len(rows)} rows, {len(skipped)} skipped or failed)")
    for t in tgt:
        val = "" if t["value"] is None else f" = {t['value']} {t['unit']}"
        why = f" ({t['reason']})" if t.get("reason") else ""
        print(f"  [{t['status']}] {t['target']} — {t['group']}{val}{why}")
    if res["timed_out"]:
        return 124
    return 0 if res["rc"] in (0, 5) and rows else (res["rc"] or 1)


if __name__ == "__main__":
    sys.exit(main())
