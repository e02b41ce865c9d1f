"""Attention forward with knockout and last-row capture, against what one would otherwise run.

Each group is one shape (B, S, Hq, Hkv, D=128), causal prefill with an image of N=576
tokens at key 35 (LLaVA-like), a random ``keep``, the knockout applied to the text rows
after the image, and the capture of the last row over the image. Providers:

- ``sdpa`` — ``F.scaled_dot_product_attention(is_causal=True)``, no intervention: the
  speed to match (the group's baseline);
- ``sdpa-densemask-hf`` — what a transformers user gets for the authors' knockout:
  transformers' own sdpa attention function
  (``transformers.integrations.sdpa_attention.sdpa_attention_forward``) with the dense
  boolean (B, 1, S, S) causal+knockout mask; under GQA it repeats K/V to the query heads
  and SDPA takes its memory-efficient kernel on CUDA (the kernel taken is recorded in
  the row); no capture;
- ``sdpa-densemask-gqa-math`` (GQA shapes only) — ``F.scaled_dot_product_attention`` with
  the same mask and ``enable_gqa=True``, which SDPA can only run with its math kernel on
  CUDA (fp32 (B, Hq, S, S) scores): kept for reference, named by the kernel SDPA picked
  (``sdpa-densemask-gqa-<kernel>``);
- ``eager`` — materialised attention as ``output_attentions=True`` runs it (K/V repeated
  for GQA, additive mask, float32 softmax), knockout mask and full probabilities;
- ``flex`` — ``torch.compile(flex_attention, dynamic=False)`` with the equivalent
  ``mask_mod`` (block mask built once outside the timing); no capture. dynamo compiles
  once per shape and stops compiling after ``recompile_limit`` (8) shapes, after which
  flex silently runs its unfused eager path: so dynamo is reset before every shape,
  the limit is raised, the compile is checked to have produced a graph, the timed calls
  run under ``torch.compiler.set_stance("fail_on_recompile")`` and must compile nothing
  more, and on CUDA the call's peak memory must stay below the dense scores' size. The
  row's ``extra.compile`` records all of it;
- ``vgkernels-torch`` — this library's chunked torch reference, knockout + capture;
- ``vgkernels-triton`` — the fused kernel's backend entry: plain, ``+cap``, ``+ko``, ``+ko+cap``;
- ``vgkernels-api+ko+cap`` — the same through ``vgkernels.attention`` (argument checks included).

FLOPs are the useful causal work, ``4·B·Hq·D·S(S+1)/2``, for every provider.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F

from _benchlib import CUDA, DEVICE, DTYPE, INTERPRETER_SKIP, SHAPE_SET, available_bytes, gib, timing_threads

import vgkernels
from vgkernels import Capture, Knockout
from vgkernels._validate import check_attention
from vgkernels.reference import attention_ref

N_IMG = 576
KEY_START = 35
D = 128

if SHAPE_SET == "cpu":
    SHAPES = [(1, 640, 28, 4), (1, 1200, 28, 4), (1, 640, 32, 32)]
elif SHAPE_SET == "reduced":  # the shapes the issue-14 targets are stated at
    SHAPES = [(1, 1200, 28, 4), (8, 1200, 28, 4), (1, 8192, 28, 4)]
else:
    SHAPES = [(B, S, hq, hkv) for hq, hkv in ((28, 4), (32, 32)) for S in (640, 1200, 2900, 8192) for B in (1, 8)]

PROVIDERS = ["sdpa", "sdpa-densemask-hf", "sdpa-densemask-gqa", "eager", "flex", "vgkernels-torch",
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


class Prov(NamedTuple):
    fn: Callable
    note: Optional[str] = None
    extra: Optional[dict] = None
    label: Optional[str] = None  # the provider name in the results, when it depends on what ran


def sdpa_kernel_name(q, k, v, mask=None, *, is_causal=False, enable_gqa=False) -> str:
    """The kernel ``F.scaled_dot_product_attention`` dispatches these arguments to."""
    from torch.nn.attention import SDPBackend

    try:
        idx = torch._fused_sdp_choice(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa)
    except (AttributeError, TypeError, RuntimeError) as e:  # private API: say so rather than guess
        return f"unknown ({type(e).__name__})"
    names = {int(b.value) if hasattr(b, "value") else int(b): n.lower() for n, b in SDPBackend.__members__.items()}
    return names.get(int(idx), f"backend {int(idx)}")


class _HFAttentionModule(torch.nn.Module):
    """The attributes transformers' attention functions read from a decoder attention layer."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.layer_idx = 0


def _transformers_sdpa(case: Case, q, k, v, scale) -> Prov:
    """transformers' sdpa attention with the knockout as a 4-D boolean mask: repeat_kv under
    GQA (transformers enables SDPA's GQA only without a mask), ``is_causal`` off because a
    mask is given, exactly as a patched-by-mask transformers model runs its layers."""
    try:
        from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    except ImportError as e:
        pytest.skip(f"transformers' sdpa_attention_forward is not importable: {e}")
    import transformers

    G = case.Hq // case.Hkv
    mod = _HFAttentionModule(G)
    mask = case.dense_allowed()
    # The kernel SDPA will pick for the arguments transformers passes it.
    kr, vr = (repeat_kv(k, G), repeat_kv(v, G)) if G > 1 else (k, v)
    kernel = sdpa_kernel_name(q, kr, vr, mask)
    del kr, vr
    fn = lambda: sdpa_attention_forward(mod, q, k, v, mask, dropout=0.0, scaling=scale)[0]  # noqa: E731
    return Prov(fn, f"transformers {transformers.__version__} sdpa_attention_forward, 4-D bool mask"
                    f"{', K/V repeated' if G > 1 else ''}; SDPA runs its {kernel} kernel", {"sdpa_backend": kernel})


def _flex(case: Case, q, k, v, G) -> Prov:
    """Compiled FlexAttention, compiled afresh for this shape and checked to run compiled."""
    try:
        import torch._dynamo
        from torch._dynamo.utils import counters
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

    # One compile per shape: start from an empty dynamo cache so that no earlier shape
    # counts against recompile_limit (past it dynamo runs flex unfused, silently).
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    mode = "default"
    graphs0 = counters["stats"]["unique_graphs"]
    try:
        block_mask = create_block_mask(mask_mod, case.B, None, case.S, case.S, device=q.device)
        flex = torch.compile(flex_attention, dynamic=False)
        with timing_threads():  # compiled for the thread count it is timed with
            flex(q, k, v, block_mask=block_mask, enable_gqa=G > 1)
    except Exception as e:  # e.g. no compiler backend for this device
        pytest.skip(f"FlexAttention unavailable here: {type(e).__name__}: {str(e)[:200]}")
    graphs = counters["stats"]["unique_graphs"] - graphs0
    if graphs < 1:
        raise AssertionError("torch.compile(flex_attention) produced no graph: the row would time the eager path")
    # The unfused path materialises (B, Hq, S, S) scores, at least 2 bytes each.
    dense_mib = case.B * case.Hq * case.S * case.S * 2 / 2**20
    stance = getattr(torch.compiler, "set_stance", None)

    def run():
        if stance is None:
            return flex(q, k, v, block_mask=block_mask, enable_gqa=G > 1)
        # Any recompilation inside the timing raises instead of silently running eagerly.
        with stance("fail_on_recompile"):
            return flex(q, k, v, block_mask=block_mask, enable_gqa=G > 1)

    compile_info = {"call": "torch.compile(flex_attention, dynamic=False)", "mode": mode,
                    "dynamo_reset_before_shape": True, "recompile_limit": torch._dynamo.config.recompile_limit,
                    "graphs_compiled_for_shape": graphs,
                    "timed_under": "set_stance('fail_on_recompile')" if stance else "default stance (no set_stance)",
                    "dense_scores_mib": round(dense_mib, 1)}

    def check_after(peak_mib):
        after = counters["stats"]["unique_graphs"] - graphs0
        if after != graphs:
            raise AssertionError(f"flex recompiled during the timing ({after - graphs} more graphs)")
        if peak_mib is not None and peak_mib >= dense_mib:
            raise AssertionError(f"flex used {peak_mib:.0f} MiB, at least the dense scores ({dense_mib:.0f} MiB): "
                                 "it ran the unfused path")
        compile_info["verified"] = ("no recompile during timing" +
                                    ("; peak below the dense scores" if peak_mib is not None else ""))

    run.check_after = check_after
    return Prov(run, f"compiled ({mode}, dynamic=False, dynamo reset per shape); block mask built outside timing",
                {"compile": compile_info})


def _provider_fn(case: Case, provider: str) -> Prov:
    G = case.Hq // case.Hkv
    q, k, v = case.bhsd()
    scale = 1.0 / math.sqrt(D)
    if provider == "sdpa":
        kernel = sdpa_kernel_name(q, k, v, is_causal=True, enable_gqa=G > 1)
        return Prov(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1),
                    f"is_causal=True{', enable_gqa=True' if G > 1 else ''}; SDPA runs its {kernel} kernel",
                    {"sdpa_backend": kernel})
    if provider == "sdpa-densemask-hf":
        return _transformers_sdpa(case, q, k, v, scale)
    if provider == "sdpa-densemask-gqa":
        if G == 1:
            pytest.skip("no GQA at this shape: SDPA with the dense mask is the sdpa-densemask-hf row")
        mask = case.dense_allowed()
        kernel = sdpa_kernel_name(q, k, v, mask, enable_gqa=True)
        return Prov(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                    f"F.sdpa(enable_gqa=True, 4-D bool mask): SDPA runs its {kernel} kernel",
                    {"sdpa_backend": kernel}, f"sdpa-densemask-gqa-{kernel}")
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

        return Prov(eager, "materialised probabilities (output_attentions=True)")
    if provider == "flex":
        return _flex(case, q, k, v, G)
    if provider == "vgkernels-torch":
        def ref():
            return attention_ref(case.q, case.k, case.v, True, scale, None, case.knockout, case.capture, True)
        return Prov(ref, "knockout + capture")
    if provider.startswith("vgkernels-triton") or provider.startswith("vgkernels-api"):
        if not CUDA:
            pytest.skip(INTERPRETER_SKIP)
        ko = case.knockout if "+ko" in provider else None
        cap = case.capture if "+cap" in provider else None
        if provider.startswith("vgkernels-api"):
            # The public call, argument checks included.
            return Prov(lambda: vgkernels.attention(case.q, case.k, case.v, knockout=ko, capture=cap, backend="triton"),
                        "public API, validation included")
        import vgkernels.triton as vt

        a = check_attention(case.q, case.k, case.v, True, None, None, ko, cap)
        need_lse = cap is not None
        return Prov(lambda: vt.attention(a.q, a.k, a.v, a.causal, a.scale, None, a.knockout, a.capture, need_lse),
                    "kernel entry (validated once, outside timing)")
    raise ValueError(provider)


def group_name(B, S, Hq, Hkv) -> str:
    return f"attention B={B} S={S} Hq={Hq} Hkv={Hkv} D={D} {str(DTYPE).removeprefix('torch.')}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-Hq{}-Hkv{}".format(*s))
def test_attention(measure, record, shape, provider):
    B, S, Hq, Hkv = shape
    case = Case.get(B, S, Hq, Hkv)
    prov = _provider_fn(case, provider)
    measure(
        prov.fn, provider=prov.label or provider, group=group_name(B, S, Hq, Hkv),
        shape=f"B{B} S{S} Hq{Hq}/Hkv{Hkv} D{D} N{case.n}", flops=case.flops, baseline=provider == "sdpa",
        note=prov.note, rounds=None if CUDA else 3, extra=prov.extra,
    )
    check_after = getattr(prov.fn, "check_after", None)
    if check_after is not None:
        # Raises if the timed calls were not what the row claims; otherwise records the proof.
        peak = None
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = prov.fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            del out
        check_after(peak)
        record(extra=prov.extra)
