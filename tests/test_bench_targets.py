"""bench/run.py: the issue-14 targets evaluated from rows (pass, fail, unmeasured with a
reason), the ``--append`` merge, and rows kept when pytest is stopped at its time limit."""
from __future__ import annotations

import importlib.util
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


run = _load("run")

ATT = "attention B=1 S=1200 Hq=28 Hkv=4 D=128 bfloat16"
FWD = "model forward 7B-shaped LLaVA B=1 S=1200 bfloat16"


def row(group, provider, ms, baseline=False, **kw):
    return dict(name=f"bench/x.py::t[{group}-{provider}]", group=group, provider=provider, median_ms=ms,
                baseline=baseline, **kw)


def _by_target(tgt, start):
    return [t for t in tgt if t["target"].startswith(start)]


def gpu_rows():
    verified = {"compile": {"call": "torch.compile(flex_attention, dynamic=False)", "mode": "default",
                            "verified": "no recompile during timing"}}
    return run.build_rows([
        row(ATT, "sdpa", 1.0, True), row(ATT, "vgkernels-triton+ko+cap", 1.05, tflops=400.0),
        row(ATT, "vgkernels-triton+ko", 1.0), row(ATT, "flex", 1.5, extra=verified),
        row(ATT, "sdpa-densemask-hf", 2.0),
        row("metrics per-head 16x28x28 N576", "copy", 1.0, gbps=2000.0),
        row("metrics per-head 16x28x28 N576", "vgkernels-triton", 1.0, gbps=1500.0),
        row("bandwidth (device copy)", "copy", 1.0, True, gbps=4000.0),
        row(FWD, "unpatched", 100.0, True),
        row(FWD, "capture-all/composed", 104.0, extra={"paired": {"ratio": 1.02, "pairs": 10, "ratios": []}}),
        row(FWD, "capture-all/fused", 150.0), row(FWD, "knockout-L14/composed", 106.0),
        row(FWD, "capture-all+patch-per-call", 130.0),
        row("refine per question x", "plain-generate", 100.0, True), row("refine per question x", "vgrefine", 120.0),
        row("sweep 16 samples x", "output_attentions-loop", 1000.0, True), row("sweep 16 samples x", "sweep", 80.0),
    ])


def test_gpu_targets_pass_and_fail_from_the_rows():
    tgt = run.targets(gpu_rows(), [], cpu_run=False)
    (sdpa,) = _by_target(tgt, "fused knockout+capture >= 0.9x SDPA")
    assert sdpa["status"] == "pass" and abs(sdpa["value"] - 1 / 1.05) < 1e-3
    (flex,) = _by_target(tgt, "fused knockout+capture >= 1.2x compiled Flex")
    assert flex["status"] == "pass" and abs(flex["value"] - 1.5 / 1.05) < 1e-3
    (dense,) = _by_target(tgt, "fused knockout+capture >= 3x")
    assert dense["status"] == "fail"
    (cap,) = _by_target(tgt, "capture adds")
    assert cap["status"] == "fail" and abs(cap["value"] - 5.0) < 1e-3
    (met,) = _by_target(tgt, "metrics kernel")
    assert met["status"] == "pass" and met["value"] == 75.0 and "38% of the device copy" in met["reason"]
    (c,) = _by_target(tgt, "capture='all' forward <= 1.03x")
    # the fused row is not the target; the paired ratio is preferred to the ratio of medians (1.04)
    assert c["status"] == "pass" and c["value"] == 1.02 and "composed" in c["reason"] and "pairs" in c["reason"]
    (k,) = _by_target(tgt, "one-layer knockout forward <= 1.05x")
    assert k["status"] == "fail" and k["value"] == 1.06
    (vr,) = _by_target(tgt, "VGRefine")
    assert vr["status"] == "pass" and vr["value"] == 1.2
    (sw,) = _by_target(tgt, "sweep")
    assert sw["status"] == "pass" and sw["value"] == 12.5
    (st,) = _by_target(tgt, "stretch")
    assert st["status"] == "unmeasured" and "S = 8192" in st["reason"]


def test_unverified_flex_and_missing_rows_are_unmeasured_with_the_reason():
    rows = [r for r in gpu_rows() if r["provider"] not in ("vgkernels-triton+ko",)]
    for r in rows:
        if r["provider"] == "flex":
            r["extra"] = {"compile": {"call": "torch.compile(flex_attention)"}}  # not verified
    skipped = [{"test": "bench/bench_attention.py::test_attention[B1-S1200-Hq28-Hkv4-vgkernels-triton+ko]",
                "reason": "out of memory", "outcome": "failed"}]
    tgt = run.targets(rows, skipped, cpu_run=False)
    (flex,) = _by_target(tgt, "fused knockout+capture >= 1.2x compiled Flex")
    assert flex["status"] == "unmeasured" and "not verified" in flex["reason"]
    (cap,) = _by_target(tgt, "capture adds")
    assert cap["status"] == "unmeasured" and "failed: out of memory" in cap["reason"]


def test_cpu_run_keeps_gpu_targets_unmeasured_and_applies_the_cpu_ratios():
    cpu_fwd = "model forward tiny-but-long LLaVA B=2 S=630 float32"
    rows = run.build_rows([row(cpu_fwd, "unpatched", 100.0, True), row(cpu_fwd, "capture-all", 108.0),
                           row(cpu_fwd, "knockout-L4", 125.0),
                           row("refine per question y", "plain-generate", 100.0, True),
                           row("refine per question y", "vgrefine", 90.0),
                           row("metrics per-head 16x28x28 N576", "copy", 1.0, gbps=10.0)])
    skipped = [{"test": "bench/bench_cuda.py::test_cuda_metrics[per-head 16x28x28 N576-vgkernels-triton]",
                "reason": "the CUDA comparisons need a GPU", "outcome": "skipped"},
               {"test": "bench/bench_metrics.py::test_metrics[per-head 16x28x28 N576-vgkernels-triton]",
                "reason": "Triton kernels run only in the interpreter", "outcome": "skipped"}]
    tgt = run.targets(rows, skipped, cpu_run=True)
    (c,) = _by_target(tgt, "capture='all' forward <= 1.10x")
    assert c["status"] == "pass" and c["value"] == 1.08
    (k,) = _by_target(tgt, "one-layer knockout forward <= 1.20x")
    assert k["status"] == "fail" and k["value"] == 1.25
    (vr,) = _by_target(tgt, "VGRefine")
    assert vr["status"] == "unmeasured" and vr["value"] == 0.9 and "CPU run" in vr["reason"]
    (met,) = _by_target(tgt, "metrics kernel")  # the reason of this group's own row, not bench_cuda's
    assert met["status"] == "unmeasured" and met["reason"].endswith("skipped: Triton kernels run only in the interpreter")
    for t in tgt:
        assert t["status"] in ("pass", "fail", "unmeasured") and (t["status"] != "unmeasured" or t["reason"])
    md = run.markdown({"device_name": "cpu", "date": "d", "cpu_run": True, "torch": "t", "triton": "t",
                       "python": "p", "shape_set": "cpu", "parts": []}, rows, tgt, skipped)
    assert "unmeasured: no attention rows in this run" in md and "| pass (row capture-all, ratio of medians) |" in md
    assert "**fail**" in md


def test_append_replaces_remeasured_rows_and_keeps_the_rest():
    old = {"rows": run.build_rows([row("g", "a", 2.0, True), row("g", "b", 4.0)]),
           "skipped": [{"test": "x::c", "reason": "r"}]}
    new = run.build_rows([row("g", "b", 1.0)])
    rows, skipped = run.merge(old, new, [{"test": "x::d", "reason": "r2"}])
    got = {r["provider"]: r for r in rows}
    assert got["b"]["median_ms"] == 1.0 and got["b"]["ratio_to_baseline"] == 2.0 and got["a"]["baseline"]
    assert [s["test"] for s in skipped] == ["x::c", "x::d"]
    # the last streamed record of a row wins (a benchmark may update its note after measuring)
    again = run.build_rows([row("g", "a", 2.0, True, note="first"), row("g", "a", 2.0, True, note="second")])
    assert len(again) == 1 and again[0]["note"] == "second"


def test_a_run_stopped_at_its_time_limit_keeps_the_rows_it_finished(tmp_path):
    bench = tmp_path / "bench_fake.py"
    bench.write_text(textwrap.dedent("""
        import json, os, time

        def test_a():
            with open(os.environ["BENCH_ROWS"], "a") as f:
                f.write(json.dumps({"name": "fake::a", "group": "g", "provider": "p", "median_ms": 1.0,
                                    "baseline": True}) + "\\n")

        def test_b():
            time.sleep(120)
    """))
    t = time.monotonic()
    res = run.run_pytest([str(bench)], ["-p", "no:randomly"], False, time_limit=8)
    assert time.monotonic() - t < 60
    assert res["timed_out"] is True
    assert [r["name"] for r in res["rows"]] == ["fake::a"]
