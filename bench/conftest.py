"""Shared harness of the benchmarks (``bench/bench_*.py``, run by ``bench/run.py``).

Every benchmark calls the ``measure`` fixture, which times a callable and records the
row that ``bench/run.py`` tabulates:

``provider``   who computes it (``vgkernels-triton``, ``sdpa``, ...)
``group``      the comparison it belongs to; rows of one group are compared with the
               group's ``baseline`` row measured in the same run
``shape``      a short human-readable shape string
``baseline``   True for the row the others are divided by (e.g. plain SDPA)
``median_ms``  on CUDA, by ``level``: ``"kernel"`` — the CUDA-event median over launches
               with the L2 cache flushed (``triton.testing.do_bench``); ``"model"`` (one call
               is a whole forward / generate / sweep) — the median of CUDA-event timings
               of ``rounds`` calls. On CPU, the median *process CPU time* of ``rounds``
               calls on one thread: other jobs on a shared machine disturb it far less
               than wall-clock time (pytest-benchmark's wall-clock statistics stay in its
               JSON as a cross-check)
``tflops`` / ``gbps``   from the ``flops`` / ``bytes`` the benchmark declares
``peak_mib``   on CUDA, the peak memory allocated during one call beyond what was
               allocated before it (the call's working memory); None on CPU
``extra.paired`` the median cost ratio row / baseline over alternating pairs of calls
               (``measure(paired=baseline_fn)``): the ratio the model-level targets use,
               robust to load that changes between one row's timing and another's
``note``       free text (a test may call ``record(note=...)`` again after ``measure``: the
               last record of a row wins); ``extra`` a dict of facts about the row (e.g. ``compile``: how
               FlexAttention was compiled and that the timed calls ran compiled code;
               ``sdpa_backend``: the SDPA kernel the call dispatched to)

Each finished row is appended at once to ``$BENCH_ROWS`` (``_benchlib.emit_row``), so a
run stopped at its time limit keeps what it measured. A provider that cannot run here
calls ``pytest.skip(reason)``; the reason goes to ``$BENCH_SKIPS``.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

import pytest
import torch

from _benchlib import CUDA, DEVICE, emit_row, timing_threads


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _cuda_median_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _cuda_peak_mib(fn) -> float:
    _sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    _sync()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def on_cpu() -> bool:
    return not CUDA


@pytest.fixture
def record(request, benchmark):
    """``record(**info)``: attach ``info`` to the benchmark and stream the row to disk."""

    def _record(**info):
        benchmark.extra_info.update(info)
        stats = getattr(benchmark, "stats", None)
        rounds = len(stats.stats.data) if stats is not None else None
        emit_row(request.node.nodeid, dict(benchmark.extra_info), rounds)

    return _record


@pytest.fixture
def measure(benchmark, record):
    """``measure(fn, provider=..., group=..., shape=..., flops=None, bytes=None, baseline=False,
    note=None, rounds=None, level="kernel", extra=None, paired=None, paired_rounds=None)`` times
    ``fn`` (no arguments) and records the row; returns the median in ms. With ``paired`` (the
    group baseline's callable), it also times ``paired_rounds`` alternating (baseline, fn)
    pairs and records the median per-pair cost ratio as ``extra.paired.ratio``. ``context`` (a
    factory of context managers, e.g. ``lambda: patch_model(model, ...)``) is entered once
    around the row's timing, and around each row call of the pairs, outside the timed call."""

    def _measure(fn, *, provider, group, shape, flops=None, bytes=None, baseline=False, note=None, rounds=None,
                 level="kernel", extra=None, paired=None, paired_rounds=None, context=None):
        if level not in ("kernel", "model"):
            raise ValueError(f"level: expected 'kernel' or 'model', got {level!r}")
        times: list = []

        def timed(f) -> float:
            """One call of ``f`` in ms: process CPU time on CPU, CUDA events on a GPU."""
            if not CUDA:
                t0 = time.process_time()
                f()
                return (time.process_time() - t0) * 1e3
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        if not CUDA or level == "model":
            def call():
                times.append(timed(fn))
        else:
            def call():
                out = fn()
                _sync()
                return out

        ctx = context() if context is not None else contextlib.nullcontext()
        with timing_threads(), ctx:  # e.g. the model patched once for the whole timing
            call()  # compile / autotune / warm caches outside the timing
            peak = _cuda_peak_mib(fn) if CUDA else None
            if rounds is None:
                rounds = 10 if (level == "model" and CUDA) else 5
            times.clear()
            benchmark.pedantic(call, rounds=rounds, warmup_rounds=1 if level == "kernel" else 0, iterations=1)
            if not times and (not CUDA or level == "model"):  # benchmarks disabled: one timed call
                call()
        if paired is not None:
            # Alternate baseline and row calls: whatever else the machine does then weighs on
            # both, and the median of the per-pair ratios is the cost ratio to quote.
            def row():
                if context is None:
                    return timed(fn)
                with context():  # entered and left outside the timed call
                    return timed(fn)

            with timing_threads():
                timed(paired)
                ratios = []
                for i in range(paired_rounds or rounds):
                    if i % 2:
                        t_row, t_base = row(), timed(paired)
                    else:
                        t_base, t_row = timed(paired), row()
                    ratios.append(t_row / t_base)
            extra = dict(extra or {}, paired={"ratio": statistics.median(ratios), "pairs": len(ratios),
                                              "ratios": [round(r, 4) for r in ratios]})
        if not CUDA:
            median_ms = statistics.median(times)
            timer = "process CPU time on one thread, median of calls"
        elif level == "model":
            median_ms = statistics.median(times)
            timer = "cuda events, median of calls"
        else:
            median_ms = _cuda_median_ms(fn)
            timer = "cuda-events (do_bench, L2 flushed)"
        record(
            provider=provider, group=group, shape=shape, baseline=bool(baseline), median_ms=median_ms,
            tflops=(flops / (median_ms * 1e-3) / 1e12) if flops else None,
            gbps=(bytes / (median_ms * 1e-3) / 1e9) if bytes else None,
            peak_mib=peak, device=torch.cuda.get_device_name() if CUDA else "cpu", timer=timer, note=note,
            level=level, extra=extra or None,
        )
        return median_ms

    return _measure


def pytest_runtest_logreport(report):
    """Record why a provider was skipped or failed, so that the results file says it."""
    path = os.environ.get("BENCH_SKIPS")
    if not path or not (report.skipped or report.failed):
        return
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
    else:
        crash = getattr(report.longrepr, "reprcrash", None)
        reason = f"{report.when} failed: " + (crash.message if crash is not None else str(report.longrepr)[-500:])
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "reason": reason[:1000],
                            "outcome": "skipped" if report.skipped else "failed"}) + "\n")
