"""Attention forward with knockout and last-row capture, against what one would otherwise run.

Each group is one shape (B, S, Hq, Hkv, D=128), causal prefill with an image of N=576
tokens at key 35 (LLaVA-like), a random ``keep``, the knockout applied to the text rows
after the image, and the capture of the last row over the image. Providers:

- ``sdpa`` — ``F.scaled_dot_product_attention(is_causal=True)``, no intervention: the
  speed to match (the group's baseline);
- ``sdpa-densemask`` — SDPA with the dense boolean (B, 1, S, S) causal+knockout mask
  (the authors' way of knocking out); no capture;
- ``eager`` — materialised attention as ``output_attentions=True`` runs it (K/V repeated
  for GQA, additive mask, float32 softmax), knockout mask and full probabilities;
- ``flex`` — compiled FlexAttention with the equivalent ``mask_mod`` (block mask built
  once outside the timing); no capture;
- ``vgkernels-torch`` — this library's chunked torch reference, knockout + capture;
- ``vgkernels-triton`` — the fused kernel's backend entry: plain, ``+cap``, ``+ko``, ``+ko+cap``;
- ``vgkernels-api+ko+cap`` — the same through ``vgkernels.attention`` (argument checks included).

FLOPs are the useful causal work, ``4·B·Hq·D·S(S+1)/2``, for every provider.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _benchlib import CUDA, DEVICE, DTYPE, INTERPRETER_SKIP, SMALL, available_bytes, gib

import vgkernels
from vgkernels import Capture, Knockout
from vgkernels._validate import check_attention
from vgkernels.reference import attention_ref

N_IMG = 576
KEY_START = 35
D = 128

if SMALL:
    SHAPES = [(1, 640, 28, 4), (1, 1200, 28, 4), (1, 640, 32, 32)]
else:
    SHAPES = [(B, S, hq, hkv) for hq, hkv in ((28, 4), (32, 32)) for S in (640, 1200, 2900, 8192) for B in (1, 8)]

PROVIDERS = ["sdpa", "sdpa-densemask", "eager", "flex", "vgkernels-torch",
             "vgkernels-triton", "vgkernels-triton+cap", "vgkernels-triton+ko", "vgkernels-triton+ko+cap",
             "vgkernels-api+ko+cap"]


class Case:
    """Inputs of one shape, built once per shape and shared by its providers."""

    _cache: dict = {}

    @classmethod
    def get(cls, B, S, Hq, Hkv):
        key = (B, S, Hq, Hkv)
        if key not in cls._cache:
            cls._cache.clear()  # one shape's tensors at a time
            cls._cache[key] = cls(B, S, Hq, Hkv)
        return cls._cache[key]

    def __init__(self, B, S, Hq, Hkv):
        g = torch.Generator().manual_seed(1234)
        self.B, self.S, self.Hq, self.Hkv = B, S, Hq, Hkv
        self.q = torch.randn(B, S, Hq, D, generator=g).to(DEVICE, DTYPE)
        self.k = torch.randn(B, S, Hkv, D, generator=g).to(DEVICE, DTYPE)
        self.v = torch.randn(B, S, Hkv, D, generator=g).to(DEVICE, DTYPE)
        n = min(N_IMG, S - KEY_START - 1)
        self.n = n
        keep = (torch.rand(B, n, generator=g) >= 0.5).to(DEVICE)
        qs = torch.full((B,), KEY_START + n, dtype=torch.int64)
        self.knockout = Knockout(qs, torch.full((B,), S), torch.full((B,), KEY_START), keep, "renorm")
        self.capture = Capture(torch.full((B,), S - 1), torch.full((B,), KEY_START), n)
        self.keep = keep
        self.flops = 4.0 * B * Hq * D * S * (S + 1) / 2

    # (B, H, S, D) views for SDPA / Flex / eager, no copies
    def bhsd(self):
        return self.q.transpose(1, 2), self.k.transpose(1, 2), self.v.transpose(1, 2)

    def dense_allowed(self):
        """(B, 1, S, S) bool: causal and not knocked out."""
        S, dev = self.S, self.q.device
        pos = torch.arange(S, device=dev)
        allowed = (pos[None, :] <= pos[:, None]).expand(self.B, S, S).clone()
        rel = pos - KEY_START
        in_span = (rel >= 0) & (rel < self.n)
        dropped = in_span[None, :] & ~self.keep[:, rel.clamp(0, self.n - 1)]  # (B, S) keys
        rows = (pos >= KEY_START + self.n)[None, :, None]  # text rows after the image
        allowed &= ~(rows & dropped[:, None, :])
        return allowed[:, None]


def _provider_fn(case: Case, provider: str):
    G = case.Hq // case.Hkv
    q, k, v = case.bhsd()
    scale = 1.0 / math.sqrt(D)
    if provider == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1), None
    if provider == "sdpa-densemask":
        mask = case.dense_allowed()
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G > 1), None
    if provider == "eager":
        B, S, Hq = case.B, case.S, case.Hq
        need = B * Hq * S * S * (4 + 4 + torch.finfo(DTYPE).bits // 8)  # scores fp32, softmax fp32, probs
        if need > 0.7 * available_bytes():
            pytest.skip(f"eager materialised attention needs ~{gib(need):.1f} GiB here, more than is free")
        add = torch.zeros(B, 1, S, S, dtype=torch.float32, device=q.device)
        add.masked_fill_(~case.dense_allowed(), torch.finfo(torch.float32).min)

        def eager():
            kr = k.repeat_interleave(G, dim=1) if G > 1 else k  # as transformers' repeat_kv
            vr = v.repeat_interleave(G, dim=1) if G > 1 else v
            s = torch.matmul(q, kr.transpose(-1, -2)).float() * scale + add
            p = torch.softmax(s, dim=-1).to(q.dtype)
            return torch.matmul(p, vr), p

        return eager, None
    if provider == "flex":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            pytest.skip(f"FlexAttention not in this torch: {e}")
        keep, n = case.keep, case.n
        q_from = KEY_START + n

        def mask_mod(b, h, qi, kj):
            rel = kj - KEY_START
            in_span = (rel >= 0) & (rel < n)
            kept = keep[b, rel.clamp(0, n - 1)]
            return (kj <= qi) & ~((qi >= q_from) & in_span & ~kept)

        try:
            block_mask = create_block_mask(mask_mod, case.B, None, case.S, case.S, device=q.device)
            flex = torch.compile(flex_attention, dynamic=False)
            flex(q, k, v, block_mask=block_mask, enable_gqa=G > 1)
        except Exception as e:  # e.g. no compiler backend for this device
            pytest.skip(f"FlexAttention unavailable here: {type(e).__name__}: {str(e)[:200]}")
        return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=G > 1), "block mask built outside timing"
    if provider == "vgkernels-torch":
        def ref():
            return attention_ref(case.q, case.k, case.v, True, scale, None, case.knockout, case.capture, True)
        return ref, "knockout + capture"
    if provider.startswith("vgkernels-triton") or provider.startswith("vgkernels-api"):
        if not CUDA:
            pytest.skip(INTERPRETER_SKIP)
        ko = case.knockout if "+ko" in provider else None
        cap = case.capture if "+cap" in provider else None
        if provider.startswith("vgkernels-api"):
            # The public call: validation reads the index vectors back (one synchronisation).
            return (lambda: vgkernels.attention(case.q, case.k, case.v, knockout=ko, capture=cap, backend="triton"),
                    "public API, validation included")
        import vgkernels.triton as vt

        a = check_attention(case.q, case.k, case.v, True, None, None, ko, cap)
        need_lse = cap is not None
        return (lambda: vt.attention(a.q, a.k, a.v, a.causal, a.scale, None, a.knockout, a.capture, need_lse),
                "kernel entry (validated once, outside timing)")
    raise ValueError(provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-Hq{}-Hkv{}".format(*s))
def test_attention(measure, shape, provider):
    B, S, Hq, Hkv = shape
    case = Case.get(B, S, Hq, Hkv)
    fn, note = _provider_fn(case, provider)
    dt = str(DTYPE).removeprefix("torch.")
    measure(
        fn, provider=provider, group=f"attention B={B} S={S} Hq={Hq} Hkv={Hkv} D={D} {dt}",
        shape=f"B{B} S{S} Hq{Hq}/Hkv{Hkv} D{D} N{case.n}", flops=case.flops, baseline=provider == "sdpa",
        note=note, rounds=None if CUDA else 3,
    )
