"""Shared harness of the microbenchmarks (``bench/bench_*.py``, run by ``bench/run.py``).

Every benchmark calls the ``measure`` fixture, which times a callable with
pytest-benchmark and attaches what ``bench/run.py`` tabulates as ``extra_info``:

``provider``   who computes it (``vgkernels-triton``, ``sdpa``, ...)
``group``      the comparison it belongs to; rows of one group are compared with the
               group's ``baseline`` row measured in the same run
``shape``      a short human-readable shape string
``baseline``   True for the row the others are divided by (e.g. plain SDPA)
``median_ms``  on CUDA: CUDA-event median over launches with the L2 cache flushed
               (``triton.testing.do_bench``); on CPU: pytest-benchmark's median
``tflops`` / ``gbps``   from the ``flops`` / ``bytes`` the benchmark declares
``peak_mib``   on CUDA, the peak memory allocated during one call beyond what was
               allocated before it (the call's working memory); None on CPU
``note``       free text (e.g. "interpreter")

A provider that cannot run here calls ``pytest.skip(reason)``; the reason is collected
into the results file by ``bench/run.py`` (``BENCH_SKIPS`` names the file to append to).
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from _benchlib import CUDA, DEVICE


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
def measure(benchmark):
    """``measure(fn, provider=..., group=..., shape=..., flops=None, bytes=None, baseline=False,
    note=None, rounds=None)`` times ``fn`` (no arguments) and records the row."""

    def _measure(fn, *, provider, group, shape, flops=None, bytes=None, baseline=False, note=None, rounds=None):
        def call():
            out = fn()
            _sync()
            return out

        call()  # compile / autotune / warm caches outside the timing
        peak = _cuda_peak_mib(fn) if CUDA else None
        if rounds is None:
            # On CUDA the reported median is do_bench's; pytest-benchmark's rounds are a cross-check.
            rounds = 5
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
        if CUDA:
            median_ms = _cuda_median_ms(fn)
        elif getattr(benchmark, "stats", None) is not None:
            median_ms = benchmark.stats.stats.median * 1e3
        else:  # benchmarks disabled (plain `pytest bench`): one timed call so the row still says something
            t0 = time.perf_counter()
            call()
            median_ms = (time.perf_counter() - t0) * 1e3
        info = benchmark.extra_info
        info.update(
            provider=provider, group=group, shape=shape, baseline=bool(baseline), median_ms=median_ms,
            tflops=(flops / (median_ms * 1e-3) / 1e12) if flops else None,
            gbps=(bytes / (median_ms * 1e-3) / 1e9) if bytes else None,
            peak_mib=peak, device=torch.cuda.get_device_name() if CUDA else "cpu",
            timer="cuda-events (do_bench, L2 flushed)" if CUDA else "wall clock (pytest-benchmark)",
            note=note,
        )
        return median_ms

    return _measure


def pytest_runtest_logreport(report):
    """Record why a provider was skipped, so that the results file says it."""
    path = os.environ.get("BENCH_SKIPS")
    if not path or not report.skipped:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")}) + "\n")
