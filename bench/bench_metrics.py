"""The grounding-metrics reduction: GB/s against the device's own copy bandwidth.

Per-head figures for a batch of 16 samples × 28 layers × 28 heads over a 24×24 image
(N = 576), one box mask per sample broadcast over layers and heads; the per-layer
head-mean variant; and long rows (N = 16384). Providers:

- ``copy`` — ``attn.clone()`` (reads and writes attn once): the measured memory
  bandwidth that ``bench/run.py`` states the kernel's GB/s against;
- ``torch-fp32`` — the reference formulas in float32 (the group's baseline);
- ``vgkernels-torch`` — ``vgkernels.reference.grounding_metrics_ref`` as shipped (float64);
- ``vgkernels-triton`` — the reduction kernel.

GB/s counts the bytes a single pass must move: attn, the (broadcast) mask and
reference once, and the three float32 outputs.

``bandwidth`` — one large device copy (1 GiB on a GPU, 256 MiB on CPU, read + write
counted): the device's memory bandwidth measured in this run, beside the same-size
``copy`` of each metrics group (``bench/run.py`` states the metrics target against the
same-size copy and reports the fraction of this one too).
"""
from __future__ import annotations

import pytest
import torch

from _benchlib import CUDA, DEVICE, INTERPRETER_SKIP

import vgkernels
from vgkernels.reference import grounding_metrics_ref

CASES = {  # name: (attn shape, head_mean)
    "per-head 16x28x28 N576": ((16, 28, 28, 576), False),
    "per-layer head-mean 16x28x(28) N576": ((16, 28, 28, 576), True),
}
if CUDA:  # long rows (the multi-tile path) on every GPU run
    CASES["per-head 512 N16384"] = ((16, 32, 16384), False)

PROVIDERS = ["copy", "torch-fp32", "vgkernels-torch", "vgkernels-triton"]


def _inputs(shape, head_mean):
    g = torch.Generator().manual_seed(7)
    attn = torch.softmax(torch.randn(shape, generator=g) * 3, dim=-1).to(DEVICE)
    N = shape[-1]
    mask_shape = (shape[0],) + (1,) * (len(shape) - 2) + (N,)
    mask = (torch.rand(mask_shape, generator=g) < 0.1).to(DEVICE)
    if head_mean:
        mask = mask[:, 0] if len(shape) == 4 else mask
    return attn, mask


def _bytes(attn, mask, head_mean):
    out_rows = attn.numel() // attn.shape[-1] // (attn.shape[-2] if head_mean else 1)
    return attn.numel() * attn.element_size() + mask.numel() * mask.element_size() + 3 * 4 * out_rows


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_metrics(measure, case, provider):
    shape, head_mean = CASES[case]
    attn, mask = _inputs(shape, head_mean)
    nbytes = _bytes(attn, mask, head_mean)
    if provider == "copy":
        fn = attn.clone
        nbytes = 2 * attn.numel() * attn.element_size()
    elif provider == "torch-fp32":
        if head_mean:
            fn = lambda: grounding_metrics_ref(attn.mean(-2), mask, compute_dtype=torch.float32)  # noqa: E731
        else:
            fn = lambda: grounding_metrics_ref(attn, mask, compute_dtype=torch.float32)  # noqa: E731
    elif provider == "vgkernels-torch":
        if head_mean:
            fn = lambda: grounding_metrics_ref(attn.mean(-2), mask)  # noqa: E731
        else:
            fn = lambda: vgkernels.grounding_metrics(attn, mask, backend="torch")  # noqa: E731
    else:
        if not CUDA:
            pytest.skip(INTERPRETER_SKIP)
        from vgkernels.triton import grounding_metrics as gm_triton

        if head_mean:
            fn = lambda: gm_triton(attn, mask, None, 1e-12, head_mean=True)  # noqa: E731
        else:
            fn = lambda: vgkernels.grounding_metrics(attn, mask, backend="triton")  # noqa: E731
    rows = attn.numel() // attn.shape[-1]
    desc = f"{rows} maps -> {rows // shape[-2]} head-means, N{shape[-1]}" if head_mean else f"{rows} rows x N{shape[-1]}"
    measure(fn, provider=provider, group=f"metrics {case}", shape=desc, bytes=nbytes,
            baseline=provider == "torch-fp32", note="measured bandwidth" if provider == "copy" else None)


BANDWIDTH_GROUP = "bandwidth (device copy)"


def test_copy_bandwidth(measure):
    nbytes = (1 << 30) if CUDA else (256 << 20)
    buf = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    measure(buf.clone, provider="copy", group=BANDWIDTH_GROUP, shape=f"{nbytes >> 20} MiB float32",
            bytes=2 * nbytes, baseline=True, note="read + write counted")
