"""``backend="cuda"``: the hand-written CUDA kernels of ``csrc/`` (extension ``vgkernels._C``).

Importing this module imports ``vgkernels._C``, whose load registers three operators
under ``torch.ops.vgkernels``; without the compiled extension the import raises
``ImportError`` and :mod:`vgkernels._dispatch` turns that into a ``RuntimeError`` saying
how to build it. The functions below receive arguments already checked by
:mod:`vgkernels._validate` (the backend contract of :mod:`vgkernels._dispatch`).

Kernels
-------
- :func:`attention` — short-query attention (``Sq <= 128`` query rows against a long KV
  cache), split over the keys (flash-decoding) and merged by log-sum-exp, on tensor cores
  (``mma.sync`` m16n8k16, sm_80+). ``q (B, Sq, Hq, D)``, ``k, v (B, Sk, Hkv, D)``,
  ``D ∈ {64, 80, 96, 128}``, float16 or bfloat16. Row ``i`` sits at ``Sk - Sq + i``. With
  ``s_j = scale · q·k_j`` over allowed keys ``A`` (causal, padding) and knocked keys ``K``:
  ``renorm``: ``lse = log Σ_{A\\K} e^{s_j}``; ``zero``: ``lse = log Σ_A e^{s_j}``; in both
  ``out = Σ_{A\\K} e^{s_j - lse} v_j``. ``Capture`` re-derives the row's applied
  probabilities from the merged ``lse``. Longer query blocks raise ``NotImplementedError``
  (use ``backend="triton"``); nothing falls back silently.
- :func:`capture_from_lse` — ``exp(scale · q_row·k_j − lse_row)`` over a key span, one
  pass over K with 16-byte loads, all query heads of a KV group served from one read
  (float16, bfloat16, float32; ``D`` a multiple of 16 bytes, at most 256).
- :func:`grounding_metrics` — AR, KL, JS per row (SPEC §3), one block per row, float64
  sums, any ``N``.

Dispatch rule
-------------
``backend="auto"`` never picks this backend: it stays Triton on CUDA tensors. The CUDA
kernels are used only when ``backend="cuda"`` is asked for explicitly. The rule changes
only if ``bench/bench_cuda.py`` shows the CUDA kernel ahead of Triton for a shape class on
the GPUs we support; no such measurement exists yet.

The functions below never synchronise with the host (the operators read no values
back), and the operators have fake implementations (:mod:`vgkernels._cuda_meta`), so a
``torch.compile`` graph can hold them.

Layout requirements: all tensors on one CUDA device; ``q``, ``k``, ``v`` with a
contiguous last dim. The kernels read 16-byte rows, so a tensor whose data pointer or
strides are not multiples of 16 bytes is copied with ``.contiguous()`` first (correct,
but the copy costs a pass over it).
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.vgkernels.*)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(f"the CUDA extension vgkernels._C is not built or cannot be loaded: {e}") from e

from . import _cuda_meta
from ._types import Capture, GroundingMetrics, Knockout

# Fake (meta) implementations, so that torch.compile can trace graphs calling these ops.
_cuda_meta.register("vgkernels")

MAX_QUERY_ROWS = 128
HEAD_DIMS = (64, 80, 96, 128)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
CAPTURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KNOCKOUT_MODE = {"renorm": 1, "zero": 2}

_ops = torch.ops.vgkernels


def _aligned16(t: torch.Tensor) -> bool:
    """Whether the kernels can read ``t``'s rows with 16-byte loads as it is."""
    if t.numel() == 0:
        return True
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    es = t.element_size()
    return all(size == 1 or (stride * es) % 16 == 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]))


def _rows16(t: torch.Tensor) -> torch.Tensor:
    return t if _aligned16(t) else t.contiguous()


def _need_cuda(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"backend='cuda': {name} must be a CUDA tensor, got one on {t.device}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Optional[torch.Tensor],
    knockout: Optional[Knockout],
    capture: Optional[Capture],
    need_lse: bool,
    *,
    num_splits: int = 0,
):
    """Short-query attention; see the module docstring for the mathematics.

    ``num_splits`` (keyword, not part of the backend contract) forces the number of
    key splits; 0 lets the kernel choose from the shape and the device. Returns
    ``(out (B, Sq, Hq, D) q.dtype, lse (B, Hq, Sq) float32 | None, probs (B, Hq, N) | None)``.
    """
    _need_cuda("q", q)
    B, Sq, Hq, D = q.shape
    if Sq > MAX_QUERY_ROWS:
        raise NotImplementedError(
            f"backend='cuda' attention handles at most {MAX_QUERY_ROWS} query rows (the short-query "
            f"kernel); got Sq={Sq}. Use backend='triton' for longer query blocks."
        )
    if q.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"backend='cuda' attention supports float16 and bfloat16, got {q.dtype}; "
                        f"use backend='triton' or 'torch'")
    if D not in HEAD_DIMS:
        raise NotImplementedError(f"backend='cuda' attention supports head dims {HEAD_DIMS}, got D={D}")
    q, k, v = _rows16(q), _rows16(k), _rows16(v)
    ko_args = (None, None, None, None, 0)
    if knockout is not None:
        ko_args = (knockout.query_start, knockout.query_end, knockout.key_start, knockout.keep,
                   _KNOCKOUT_MODE[knockout.mode])
    cap_args = (None, None, 0)
    if capture is not None:
        cap_args = (capture.row, capture.key_start, int(capture.length))
    out, lse, probs = _ops.decode_attention(
        q, k, v, bool(causal), float(scale), key_padding_mask, *ko_args, *cap_args, int(num_splits)
    )
    return out, (lse if need_lse else None), (probs if capture is not None else None)


def capture_from_lse(
    q_row: torch.Tensor,
    k: torch.Tensor,
    lse_row: torch.Tensor,
    key_start: torch.Tensor,
    length: int,
    scale: float,
    keep: Optional[torch.Tensor],
) -> torch.Tensor:
    """``probs[b, h, j] = exp(scale · q_row[b, h]·k[b, key_start[b] + j, h // G] − lse_row[b, h])``
    times ``keep[b, j]``. ``q_row (B, Hq, D)``, ``k (B, Sk, Hkv, D)``, ``lse_row (B, Hq)``;
    returns ``(B, Hq, length)`` float32."""
    _need_cuda("k", k)
    if k.dtype not in CAPTURE_DTYPES:
        raise TypeError(f"backend='cuda' capture_from_lse supports float16, bfloat16 and float32, got {k.dtype}")
    if q_row.stride(-1) != 1:
        q_row = q_row.contiguous()
    return _ops.capture_rows(q_row, _rows16(k), lse_row, key_start, int(length), float(scale), keep)


def grounding_metrics(
    attn: torch.Tensor,
    mask: torch.Tensor,
    reference: Optional[torch.Tensor],
    eps: float,
) -> GroundingMetrics:
    """AR, KL, JS of each row of ``attn (..., N)`` against ``mask`` (SPEC §3); float32,
    shaped ``attn.shape[:-1]``. ``mask`` and ``reference`` broadcast without copies."""
    _need_cuda("attn", attn)
    ar, kl, js = _ops.metrics_rows(attn, mask, reference, float(eps))
    return GroundingMetrics(ar, kl, js)
