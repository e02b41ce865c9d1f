"""Peak memory of one prefill: ``patch_model`` capture on every layer vs ``output_attentions=True``.

The authors capture the last token's attention with ``output_attentions=True`` on an eager
model: every layer materialises and returns its ``(B, H, S, S)`` probabilities, so memory
grows as ``L·H·S²``. ``patch_model(capture="all")`` keeps only ``(B, L, H, N)``.

Model: a tiny LLaVA with a long prompt — 4 decoder layers, width 512, 8 heads (head dim
64), a 16-token image, total sequence ``S`` = 2048 and 4096, batch 1. Providers:

- ``output_attentions-eager`` (baseline): eager model, ``output_attentions=True``, the rows
  sliced from the returned attentions;
- ``patch_model-capture-all``: SDPA model, ``patch_model(capture="all")`` (``backend="auto"``:
  the torch reference on CPU, Triton on CUDA);
- ``sdpa-plain``: the SDPA model's own forward, no capture (the floor).

Each measurement runs in a fresh subprocess. Peak = on CUDA, ``max_memory_allocated``
during the forward minus what was allocated before it; on CPU, the resident-set
high-water mark during the forward (``VmHWM``, reset through ``/proc/self/clear_refs``
just before it) minus the resident set before it. The ``note`` column gives the memory
ratio to the baseline; (the table's ``× base`` column is a time ratio).

    python bench/bench_memory.py            # standalone table
    python bench/run.py -- -k memory        # through the benchmark harness
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEQS = (2048, 4096)
PROVIDERS = ("output_attentions-eager", "patch_model-capture-all", "sdpa-plain")
SIZES = dict(num_layers=4, num_heads=8, num_kv_heads=8, hidden_size=512, intermediate_size=1024)


# ----------------------------------------------------------------------------- worker


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(provider: str, S: int, device: str) -> dict:
    import gc

    import torch

    import vgkernels
    from _benchlib import prompt_of_length
    from vgkernels.integrations.tiny import build_tiny, test_image

    torch.manual_seed(0)
    attn = "eager" if provider == "output_attentions-eager" else "sdpa"
    model, proc = build_tiny("tiny-llava", attn_implementation=attn, max_position_embeddings=S + 64, **SIZES)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype)
    image = test_image(64, 64)
    inputs = proc(images=image, text=prompt_of_length(proc, S, image), return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    ids = inputs["input_ids"][0]
    img = torch.nonzero(ids == model.config.image_token_index).flatten()
    ks, N = int(img[0]), int(img.numel())

    def run():
        if provider == "output_attentions-eager":
            out = model(**inputs, output_attentions=True)
            rows = torch.stack([a[0, :, -1, ks: ks + N].float() for a in out.attentions])
            return out, rows
        if provider == "patch_model-capture-all":
            with vgkernels.patch_model(model, capture="all") as vg:
                out = model(**inputs)
            return out, vg.maps
        return model(**inputs), None

    with torch.no_grad():
        run()  # warm caches and lazy imports outside the measurement
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = run()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            method = "cuda max_memory_allocated"
        else:
            before = _status_kib("VmRSS") * 1024
            if not _reset_hwm():
                raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
            out = run()
            peak = _status_kib("VmHWM") * 1024 - before
            method = "RSS high-water (VmHWM) above VmRSS before"
    del out
    return {"provider": provider, "S": S, "device": device, "peak_mib": peak / 2**20, "method": method,
            "image_tokens": N, "dtype": str(dtype)}


def measure(provider: str, S: int, device: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a measurement never runs the interpreter
    # glibc raises its mmap threshold after large frees, after which freed tensors stay
    # resident and a later peak reuses them unseen; a fixed threshold returns every large
    # block to the OS on free, so the resident set tracks the live tensors.
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", provider, str(S), device]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
    if res.returncode:
        raise RuntimeError(f"worker {provider} S={S} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- pytest-benchmark rows


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


try:
    import pytest
except ImportError:  # pragma: no cover - standalone use without pytest
    pytest = None

if pytest is not None:
    _BASE: dict = {}

    @pytest.mark.parametrize("S", SEQS)
    @pytest.mark.parametrize("provider", PROVIDERS)
    def test_memory(benchmark, record, provider, S):
        dev = _device()
        box = {}
        benchmark.pedantic(lambda: box.update(measure(provider, S, dev)), rounds=1, iterations=1)
        r = box
        key = (S, dev)
        if provider == PROVIDERS[0]:
            _BASE[key] = r["peak_mib"]
        base = _BASE.get(key)
        note = f"peak {r['peak_mib']:.1f} MiB ({r['method']})"
        if base and provider != PROVIDERS[0]:
            note += f"; output_attentions / this = {base / max(r['peak_mib'], 1e-9):.1f}x"
        record(
            provider=provider, group=f"memory S={S}", shape=f"L=4 H=8 D=64 S={S} N={r['image_tokens']} B=1",
            baseline=provider == PROVIDERS[0], median_ms=benchmark.stats.stats.median * 1e3 if benchmark.stats else None,
            peak_mib=r["peak_mib"], note=note, timer="subprocess wall clock (not the point: see peak MiB)",
        )
        assert r["peak_mib"] > 0


# ----------------------------------------------------------------------------- standalone


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="peak memory: patch_model capture vs output_attentions=True")
    p.add_argument("--worker", nargs=3, metavar=("PROVIDER", "S", "DEVICE"), help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, nargs="+", default=list(SEQS))
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), a.worker[2])))
        return 0
    dev = a.device or _device()
    rows = []
    print(f"| S | provider | peak MiB | output_attentions / provider |\n|---:|---|---:|---:|")
    for S in a.seq:
        res = {prov: measure(prov, S, dev) for prov in PROVIDERS}
        base = res[PROVIDERS[0]]["peak_mib"]
        for prov in PROVIDERS:
            r = res[prov]
            r["ratio_vs_output_attentions"] = base / max(r["peak_mib"], 1e-9)
            rows.append(r)
            print(f"| {S} | {prov} | {r['peak_mib']:.1f} | {r['ratio_vs_output_attentions']:.1f}x |", flush=True)
    print(f"\ndevice: {dev}; method: {rows[0]['method']}; dtype {rows[0]['dtype']}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
