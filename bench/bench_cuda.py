"""The CUDA extension's kernels (``backend="cuda"``) against what else computes the same thing.

Groups (all on CUDA; every provider skips with its reason where there is no GPU, no
compiled ``vgkernels._C`` or no flash-attn):

``cuda decode ...`` — short-query attention: Sq = 32 query rows at the end of a KV cache
of Sk = 4096 keys, B = 16, 28 query heads over 4 KV heads, D = 128, bfloat16, causal
(bottom-right). The knockout variant removes half of a 576-token image span at key 35
from all 32 rows and captures the last row over the span. Providers:

- ``copy`` — a device-to-device copy of a buffer as large as K and V: the HBM bandwidth
  measured in this run, to read the kernels' GB/s against (issue 7's target: the CUDA
  kernel at >= 70% of it);
- ``sdpa`` — ``F.scaled_dot_product_attention`` with a bottom-right causal mask, no
  intervention (the group's baseline); ``sdpa-densemask`` — SDPA with the dense
  (B, 1, Sq, Sk) knockout mask;
- ``flash_attn_with_kvcache`` — flash-attn's decoding kernel, where installed;
- ``vgkernels-triton`` / ``vgkernels-triton+ko+cap`` — the fused Triton kernel;
- ``vgkernels-cuda`` / ``vgkernels-cuda+ko+cap`` — the split-KV CUDA kernel.

The library providers are called through their backend modules with arguments validated
once outside the timing, so the numbers are kernel time, not argument checking.
GB/s counts K and V once plus q and out; FLOPs are ``4·B·Hq·Sq·Sk·D``.

``cuda capture ...`` — ``capture_from_lse`` of one row over a 576-key span (copy of the
span's K, torch reference, Triton, CUDA); ``cuda metrics ...`` — ``grounding_metrics``
rows (copy, Triton as the baseline, CUDA).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _benchlib import CUDA, DEVICE, SMALL

from vgkernels import Capture, Knockout, _dispatch
from vgkernels._validate import check_attention, check_capture_from_lse, check_metrics

DTYPE = torch.bfloat16
NO_GPU = "the CUDA kernels and their comparisons need a GPU (none here)"

if SMALL:
    DECODE = dict(B=2, Sq=32, Sk=1024, Hq=28, Hkv=4, D=128)
else:
    DECODE = dict(B=16, Sq=32, Sk=4096, Hq=28, Hkv=4, D=128)
N_IMG, KEY_START = 576, 35


def _backend(name: str):
    if not CUDA:
        pytest.skip(NO_GPU)
    try:
        return _dispatch.get(name, torch.device("cuda"), "attention")
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"backend {name!r} unavailable here: {e}")


class Decode:
    _cache: dict = {}

    @classmethod
    def get(cls):
        if "case" not in cls._cache:
            cls._cache["case"] = cls()
        return cls._cache["case"]

    def __init__(self):
        c = DECODE
        B, Sq, Sk, Hq, Hkv, D = c["B"], c["Sq"], c["Sk"], c["Hq"], c["Hkv"], c["D"]
        self.__dict__.update(c)
        g = torch.Generator().manual_seed(4321)
        self.q = torch.randn(B, Sq, Hq, D, generator=g).to(DEVICE, DTYPE)
        self.k = torch.randn(B, Sk, Hkv, D, generator=g).to(DEVICE, DTYPE)
        self.v = torch.randn(B, Sk, Hkv, D, generator=g).to(DEVICE, DTYPE)
        keep = (torch.rand(B, N_IMG, generator=g) >= 0.5).to(DEVICE)
        full = lambda x: torch.full((B,), x, dtype=torch.int64)  # noqa: E731
        self.knockout = Knockout(full(Sk - Sq), full(Sk), full(KEY_START), keep, "renorm")
        self.capture = Capture(full(Sk - 1), full(KEY_START), N_IMG)
        self.scale = 1.0 / math.sqrt(D)
        self.bytes = 2 * B * Sk * Hkv * D * 2 + 2 * B * Sq * Hq * D * 2
        self.flops = 4.0 * B * Hq * Sq * Sk * D
        self.shape = f"B{B} Sq{Sq} Sk{Sk} Hq{Hq}/Hkv{Hkv} D{D}"
        self.group = f"cuda decode B={B} Sq={Sq} Sk={Sk} Hq={Hq} Hkv={Hkv} D={D} bf16"

    def args(self, ko_cap: bool):
        a = check_attention(self.q, self.k, self.v, True, None, None,
                            self.knockout if ko_cap else None, self.capture if ko_cap else None)
        return (a.q, a.k, a.v, a.causal, a.scale, a.key_padding_mask, a.knockout, a.capture, True)

    def allowed(self, with_knockout: bool):
        """(B, 1, Sq, Sk) bool: bottom-right causal, and not knocked out."""
        pos = torch.arange(self.Sk - self.Sq, self.Sk, device=DEVICE)
        keys = torch.arange(self.Sk, device=DEVICE)
        allowed = (keys[None, :] <= pos[:, None]).expand(self.B, self.Sq, self.Sk).clone()
        if with_knockout:
            dropped = torch.zeros(self.B, self.Sk, dtype=torch.bool, device=DEVICE)
            dropped[:, KEY_START: KEY_START + N_IMG] = ~self.knockout.keep
            allowed &= ~dropped[:, None, :]
        return allowed[:, None]


DECODE_PROVIDERS = ["copy", "sdpa", "sdpa-densemask", "flash_attn_with_kvcache", "vgkernels-triton",
                    "vgkernels-triton+ko+cap", "vgkernels-cuda", "vgkernels-cuda+ko+cap"]


def _sdpa(case: Decode, mask):
    q, k, v = case.q.transpose(1, 2), case.k.transpose(1, 2), case.v.transpose(1, 2)
    gqa = case.Hq != case.Hkv
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _decode_fn(case: Decode, provider: str):
    if not CUDA:
        pytest.skip(NO_GPU)
    if provider == "copy":
        buf = torch.empty(2 * case.k.numel(), dtype=DTYPE, device=DEVICE)
        return buf.clone, 2 * buf.numel() * buf.element_size(), "measured bandwidth (read + write)"
    if provider == "sdpa":
        try:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(case.Sq, case.Sk)
            fn = _sdpa(case, mask)
            fn()
            note = "causal_lower_right"
        except Exception:  # older torch or no kernel for the bias: a boolean mask does the same
            fn, note = _sdpa(case, case.allowed(False)), "boolean bottom-right mask"
        return fn, case.bytes, note
    if provider == "sdpa-densemask":
        return _sdpa(case, case.allowed(True)), case.bytes, "knockout as a dense mask; no capture"
    if provider == "flash_attn_with_kvcache":
        try:
            from flash_attn import flash_attn_with_kvcache
        except ImportError as e:
            pytest.skip(f"flash-attn is not installed: {e}")
        return (lambda: flash_attn_with_kvcache(case.q, case.k, case.v, causal=True)), case.bytes, None
    name = "triton" if "triton" in provider else "cuda"
    mod = _backend(name)
    ko_cap = provider.endswith("+ko+cap")
    args = case.args(ko_cap)
    return (lambda: mod.attention(*args)), case.bytes, ("knockout + capture" if ko_cap else None)


@pytest.mark.parametrize("provider", DECODE_PROVIDERS)
def test_cuda_decode(measure, provider):
    case = Decode.get() if CUDA else None
    fn, nbytes, note = _decode_fn(case, provider)
    measure(fn, provider=provider, group=case.group, shape=case.shape, bytes=nbytes,
            flops=None if provider == "copy" else case.flops, baseline=provider == "sdpa", note=note)


# ---------------------------------------------------------------------------------------
# capture_from_lse and metrics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["copy", "vgkernels-torch", "vgkernels-triton", "vgkernels-cuda"])
def test_cuda_capture(measure, provider):
    if not CUDA:
        pytest.skip(NO_GPU)
    c = DECODE
    B, Sk, Hq, Hkv, D = c["B"], c["Sk"], c["Hq"], c["Hkv"], c["D"]
    g = torch.Generator().manual_seed(99)
    q_row = torch.randn(B, Hq, D, generator=g).to(DEVICE, DTYPE)
    k = torch.randn(B, Sk, Hkv, D, generator=g).to(DEVICE, DTYPE)
    lse = torch.full((B, Hq), 5.0, device=DEVICE)
    ks = torch.full((B,), KEY_START, dtype=torch.int64)
    a = check_capture_from_lse(q_row, k, lse, ks, N_IMG, None, None)
    nbytes = B * N_IMG * Hkv * D * 2 + B * Hq * N_IMG * 4
    if provider == "copy":
        span = k[:, KEY_START: KEY_START + N_IMG]
        fn, nbytes = span.contiguous, 2 * B * N_IMG * Hkv * D * 2
    else:
        name = {"vgkernels-torch": "torch", "vgkernels-triton": "triton", "vgkernels-cuda": "cuda"}[provider]
        try:
            mod = _dispatch.get(name, torch.device("cuda"), "capture_from_lse")
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"backend {name!r} unavailable here: {e}")
        fn = lambda: mod.capture_from_lse(a.q_row, a.k, a.lse_row, a.key_start, a.length, a.scale, a.keep)  # noqa: E731
    measure(fn, provider=provider, group=f"cuda capture B={B} Hq={Hq} Hkv={Hkv} D={D} N={N_IMG} bf16",
            shape=f"B{B} Hq{Hq}/Hkv{Hkv} D{D} N{N_IMG}", bytes=nbytes, baseline=provider == "vgkernels-torch",
            note="measured bandwidth" if provider == "copy" else None)


METRIC_CASES = {"per-head 16x28x28 N576": (16, 28, 28, 576)}
if not SMALL:
    METRIC_CASES["per-head 512 N16384"] = (16, 32, 16384)


@pytest.mark.parametrize("provider", ["copy", "vgkernels-triton", "vgkernels-cuda"])
@pytest.mark.parametrize("case", list(METRIC_CASES))
def test_cuda_metrics(measure, case, provider):
    if not CUDA:
        pytest.skip(NO_GPU)
    shape = METRIC_CASES[case]
    g = torch.Generator().manual_seed(7)
    attn = torch.softmax(torch.randn(shape, generator=g) * 3, dim=-1).to(DEVICE)
    mask = (torch.rand((shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],), generator=g) < 0.1).to(DEVICE)
    rows = attn.numel() // shape[-1]
    nbytes = attn.numel() * 4 + mask.numel() + 3 * 4 * rows
    if provider == "copy":
        fn, nbytes = attn.clone, 2 * attn.numel() * 4
    else:
        name = "triton" if provider == "vgkernels-triton" else "cuda"
        try:
            mod = _dispatch.get(name, torch.device("cuda"), "grounding_metrics")
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"backend {name!r} unavailable here: {e}")
        a, m, r = check_metrics(attn, mask, None)
        fn = lambda: mod.grounding_metrics(a, m, r, 1e-12)  # noqa: E731
    measure(fn, provider=provider, group=f"cuda metrics {case}", shape=f"{rows} rows x N{shape[-1]}",
            bytes=nbytes, baseline=provider == "vgkernels-triton",
            note="measured bandwidth" if provider == "copy" else None)
