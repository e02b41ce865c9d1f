"""Input checking shared by every backend.

Each public entry point calls one function here first. It raises ``ValueError`` (or
``TypeError`` for dtypes) naming the argument, what was received and what was
expected, and returns the arguments normalised (int64 vectors on the right device,
a float scale), so that backends never re-check and never see a surprise.

Range checks on index vectors read them back to the host: one small synchronisation
per call, which we accept so that an out-of-range span is an error, not a silent
read of somebody else's tokens.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ._types import KNOCKOUT_MODES, Capture, Knockout

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionArgs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    scale: float
    key_padding_mask: Optional[torch.Tensor]
    knockout: Optional[Knockout]
    capture: Optional[Capture]


def _shape(t) -> str:
    return str(tuple(t.shape))


def _check_tensor(name: str, t, ndim: int, expected: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor shaped {expected}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected shape {expected}, got {_shape(t)}")


def _index_vector(name: str, x, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 on ``device``; Python ints and sequences are accepted."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.dtype.is_complex:
            raise TypeError(f"{name}: expected an integer tensor shaped ({batch},), got dtype {x.dtype}")
        t = x
    else:
        t = torch.as_tensor(x)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name}: expected integers, got {x!r}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (one position per batch item), got {_shape(t)}")
    return t.to(device=device, dtype=torch.int64).contiguous()


def _check_span(name: str, start: torch.Tensor, length: int, total: int, what: str) -> None:
    lo = int(start.min()) if start.numel() else 0
    hi = int((start + length).max()) if start.numel() else 0
    if lo < 0 or hi > total:
        raise ValueError(
            f"{name}: the span [key_start, key_start + {length}) must lie inside [0, {what}={total}); "
            f"got key_start={start.tolist()}"
        )


def check_attention(q, k, v, causal, softmax_scale, key_padding_mask, knockout, capture) -> AttentionArgs:
    _check_tensor("q", q, 4, "(B, Sq, Hq, D)")
    _check_tensor("k", k, 4, "(B, Sk, Hkv, D)")
    _check_tensor("v", v, 4, "(B, Sk, Hkv, D)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got q {q.device}, k {k.device}, v {v.device}")
    B, Sq, Hq, D = q.shape
    Bk, Sk, Hkv, Dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {_shape(k)}, got {_shape(v)}")
    if Bk != B:
        raise ValueError(f"k: expected batch {B} as in q {_shape(q)}, got {_shape(k)}")
    if Dk != D:
        raise ValueError(f"k: expected head dim {D} as in q {_shape(q)}, got {_shape(k)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: Hq={Hq} must be a multiple of Hkv={Hkv} (GQA), got q {_shape(q)}, k {_shape(k)}")
    if Sq > Sk:
        raise ValueError(
            f"q: Sq={Sq} exceeds Sk={Sk}; queries are the last Sq positions of the keys (bottom-right "
            f"alignment), so Sq <= Sk is required (q {_shape(q)}, k {_shape(k)})"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name}: the last (head) dimension must be contiguous, got strides {t.stride()}; "
                             f"call .contiguous() on it")
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        try:
            scale = float(softmax_scale)
        except (TypeError, ValueError):
            raise TypeError(f"softmax_scale: expected a float, got {softmax_scale!r}") from None
        if not math.isfinite(scale):
            raise ValueError(f"softmax_scale: expected a finite float, got {softmax_scale!r}")

    kpm = None
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, 2, f"({B}, {Sk})")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = real token), "
                            f"got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Sk):
            raise ValueError(f"key_padding_mask: expected shape ({B}, {Sk}), got {_shape(key_padding_mask)}")
        kpm = key_padding_mask.to(q.device).contiguous()

    ko = None
    if knockout is not None:
        if not isinstance(knockout, Knockout):
            raise TypeError(f"knockout: expected vgkernels.Knockout, got {type(knockout).__name__}")
        if knockout.mode not in KNOCKOUT_MODES:
            raise ValueError(f"knockout.mode: expected one of {KNOCKOUT_MODES}, got {knockout.mode!r}")
        qs = _index_vector("knockout.query_start", knockout.query_start, B, q.device)
        qe = _index_vector("knockout.query_end", knockout.query_end, B, q.device)
        ks = _index_vector("knockout.key_start", knockout.key_start, B, q.device)
        keep = knockout.keep
        if not isinstance(keep, torch.Tensor) or keep.dim() != 2 or keep.shape[0] != B:
            got = _shape(keep) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"knockout.keep: expected shape ({B}, N) bool, got {got}")
        if keep.dtype != torch.bool:
            raise TypeError(f"knockout.keep: expected dtype torch.bool, got {keep.dtype}")
        N = keep.shape[1]
        _check_span("knockout.key_start", ks, N, Sk, "Sk")
        if B and (int(qs.min()) < 0 or int(qe.max()) > Sk or bool((qs > qe).any())):
            raise ValueError(
                f"knockout.query_start/query_end: expected 0 <= query_start <= query_end <= Sk={Sk}, "
                f"got query_start={qs.tolist()}, query_end={qe.tolist()}"
            )
        ko = Knockout(qs, qe, ks, keep.to(q.device).contiguous(), knockout.mode)

    cap = None
    if capture is not None:
        if not isinstance(capture, Capture):
            raise TypeError(f"capture: expected vgkernels.Capture, got {type(capture).__name__}")
        length = capture.length
        if isinstance(length, torch.Tensor):
            length = int(length)
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"capture.length: expected a non-negative int, got {capture.length!r}")
        row = _index_vector("capture.row", capture.row, B, q.device)
        cks = _index_vector("capture.key_start", capture.key_start, B, q.device)
        if B and (int(row.min()) < Sk - Sq or int(row.max()) >= Sk):
            raise ValueError(
                f"capture.row: expected positions in this call's query block [{Sk - Sq}, {Sk}) "
                f"(Sq={Sq}, Sk={Sk}), got {row.tolist()}"
            )
        _check_span("capture.key_start", cks, length, Sk, "Sk")
        cap = Capture(row, cks, length)

    return AttentionArgs(q, k, v, bool(causal), scale, kpm, ko, cap)


class CaptureFromLseArgs(NamedTuple):
    q_row: torch.Tensor
    k: torch.Tensor
    lse_row: torch.Tensor
    key_start: torch.Tensor
    length: int
    scale: float
    keep: Optional[torch.Tensor]


def check_capture_from_lse(q_row, k, lse_row, key_start, length, softmax_scale, keep) -> CaptureFromLseArgs:
    _check_tensor("q_row", q_row, 3, "(B, Hq, D)")
    _check_tensor("k", k, 4, "(B, Sk, Hkv, D)")
    _check_tensor("lse_row", lse_row, 2, "(B, Hq)")
    if q_row.dtype not in FLOAT_DTYPES or k.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q_row, k: expected floating dtypes, got {q_row.dtype}, {k.dtype}")
    if q_row.dtype != k.dtype:
        raise TypeError(f"q_row, k: expected one dtype, got q_row {q_row.dtype}, k {k.dtype}")
    if not lse_row.dtype.is_floating_point:
        raise TypeError(f"lse_row: expected a floating dtype, got {lse_row.dtype}")
    B, Hq, D = q_row.shape
    Bk, Sk, Hkv, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"k: expected (B={B}, Sk, Hkv, D={D}) to match q_row {_shape(q_row)}, got {_shape(k)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k: Hq={Hq} must be a multiple of Hkv={Hkv}, got q_row {_shape(q_row)}, k {_shape(k)}")
    if tuple(lse_row.shape) != (B, Hq):
        raise ValueError(f"lse_row: expected shape ({B}, {Hq}), got {_shape(lse_row)}")
    if isinstance(length, torch.Tensor):
        length = int(length)
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length: expected a non-negative int, got {length!r}")
    for name, t in (("q_row", q_row), ("k", k)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name}: the last (head) dimension must be contiguous, got strides {t.stride()}")
    ks = _index_vector("key_start", key_start, B, k.device)
    _check_span("key_start", ks, length, Sk, "Sk")
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or tuple(keep.shape) != (B, length):
            got = _shape(keep) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"keep: expected shape ({B}, {length}) bool, got {got}")
        if keep.dtype != torch.bool:
            raise TypeError(f"keep: expected dtype torch.bool, got {keep.dtype}")
        keep = keep.to(k.device).contiguous()
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    return CaptureFromLseArgs(q_row, k, lse_row.to(k.device), ks, length, scale, keep)


def check_metrics(attn, mask, reference):
    """Returns ``(attn, mask, reference)`` as floating tensors and the row shape."""
    if not isinstance(attn, torch.Tensor):
        attn = torch.as_tensor(attn)
    if attn.dim() < 1:
        raise ValueError("attn: expected shape (..., N), got a scalar")
    if not attn.dtype.is_floating_point:
        raise TypeError(f"attn: expected a floating dtype, got {attn.dtype}")
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if mask.dtype.is_complex:
        raise TypeError(f"mask: expected bool or 0/1 values, got {mask.dtype}")
    mask = mask.to(attn.device)
    try:
        shape = torch.broadcast_shapes(attn.shape, mask.shape)
    except RuntimeError:
        raise ValueError(f"mask: shape {_shape(mask)} does not broadcast against attn {_shape(attn)}") from None
    if shape != attn.shape:
        raise ValueError(f"mask: shape {_shape(mask)} would broadcast attn {_shape(attn)} to "
                         f"{tuple(shape)}; expected it to broadcast to attn's shape")
    if reference is not None:
        if not isinstance(reference, torch.Tensor):
            reference = torch.as_tensor(reference)
        if not reference.dtype.is_floating_point:
            raise TypeError(f"reference: expected a floating dtype, got {reference.dtype}")
        reference = reference.to(attn.device)
        try:
            rshape = torch.broadcast_shapes(attn.shape, reference.shape)
        except RuntimeError:
            raise ValueError(f"reference: shape {_shape(reference)} does not broadcast against "
                             f"attn {_shape(attn)}") from None
        if rshape != attn.shape:
            raise ValueError(f"reference: shape {_shape(reference)} would broadcast attn {_shape(attn)} "
                             f"to {tuple(rshape)}; expected it to broadcast to attn's shape")
    return attn, mask, reference


def check_heads(heads, L: int, H: int) -> list[tuple[int, int]]:
    """``heads`` as a list of ``(layer, head)`` pairs inside an ``(L, H)`` grid."""
    try:
        pairs = [(int(l), int(h)) for l, h in heads]
    except (TypeError, ValueError):
        raise ValueError(f"heads: expected a sequence of (layer, head) pairs, got {heads!r}") from None
    if not pairs:
        raise ValueError("heads: expected at least one (layer, head) pair, got none")
    bad = [(l, h) for l, h in pairs if not (0 <= l < L and 0 <= h < H)]
    if bad:
        raise ValueError(f"heads: pairs {bad} lie outside maps of {L} layers x {H} heads")
    return pairs
