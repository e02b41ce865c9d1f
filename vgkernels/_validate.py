"""Input checking shared by every backend.

Each public entry point calls one function here first. It raises ``ValueError`` (or
``TypeError`` for dtypes) naming the argument, what was received and what was
expected, and returns the arguments normalised (int64 vectors on the right device,
a float scale), so that backends never re-check and never see a surprise.

Range checks on index vectors need their values on the host. Every vector a call
checks is read back in one transfer (:func:`_read_once`): at most one device-to-host
synchronisation per public call, none when the vectors are Python ints or CPU tensors
(CPU inputs then move to the device with a non-blocking copy). Backends receive
validated arguments and never synchronise. Under ``torch.compile`` the values cannot be
read while tracing; the same conditions are then asserted on the device
(``torch._assert_async``), so a bad span fails at run time with the same message
instead of a ``ValueError``.
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


def _index_vector(name: str, x, batch: int) -> torch.Tensor:
    """(B,) int64 on the device it came on (CPU for Python ints and sequences)."""
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
    return t.to(torch.int64)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Contiguous on ``device``; a host tensor is copied without waiting for the device."""
    return t.to(device, non_blocking=True).contiguous()


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _read_once(vectors: list[torch.Tensor]) -> list[list[int]]:
    """The values of ``vectors`` (1-D int64) on the host, read in a single transfer: they
    are concatenated where they live (on the GPU when one of them is there) and read
    back once."""
    if not vectors:
        return []
    dev = next((v.device for v in vectors if v.device.type != "cpu"), torch.device("cpu"))
    flat = torch.cat([v.to(dev, non_blocking=True) for v in vectors]).tolist()
    out, i = [], 0
    for v in vectors:
        out.append(flat[i:i + v.numel()])
        i += v.numel()
    return out


def _span_error(name: str, length: int, total: int, starts) -> ValueError:
    return ValueError(
        f"{name}: the span [key_start, key_start + {length}) must lie inside [0, Sk={total}); got key_start={starts}"
    )


def _check_span(name: str, starts: list[int], length: int, total: int) -> None:
    if starts and (min(starts) < 0 or max(starts) + length > total):
        raise _span_error(name, length, total, starts)


def _assert_span(name: str, start: torch.Tensor, length: int, total: int) -> None:
    ok = ((start >= 0) & (start + length <= total)).all()
    torch._assert_async(ok, f"{name}: the span [key_start, key_start + {length}) must lie inside [0, Sk={total})")


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
        kpm = _to_device(key_padding_mask, q.device)

    ko = cap = None
    if knockout is not None:
        if not isinstance(knockout, Knockout):
            raise TypeError(f"knockout: expected vgkernels.Knockout, got {type(knockout).__name__}")
        if knockout.mode not in KNOCKOUT_MODES:
            raise ValueError(f"knockout.mode: expected one of {KNOCKOUT_MODES}, got {knockout.mode!r}")
        qs = _index_vector("knockout.query_start", knockout.query_start, B)
        qe = _index_vector("knockout.query_end", knockout.query_end, B)
        ks = _index_vector("knockout.key_start", knockout.key_start, B)
        keep = knockout.keep
        if not isinstance(keep, torch.Tensor) or keep.dim() != 2 or keep.shape[0] != B:
            got = _shape(keep) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"knockout.keep: expected shape ({B}, N) bool, got {got}")
        if keep.dtype != torch.bool:
            raise TypeError(f"knockout.keep: expected dtype torch.bool, got {keep.dtype}")
    if capture is not None:
        if not isinstance(capture, Capture):
            raise TypeError(f"capture: expected vgkernels.Capture, got {type(capture).__name__}")
        length = capture.length
        if isinstance(length, torch.Tensor):
            if length.numel() != 1 or length.dtype.is_floating_point or length.dtype == torch.bool:
                raise ValueError(f"capture.length: expected a non-negative int, got {capture.length!r}")
            length_t = length.reshape(1).to(torch.int64)
        elif isinstance(length, int) and not isinstance(length, bool):
            length_t = None
        else:
            raise ValueError(f"capture.length: expected a non-negative int, got {capture.length!r}")
        row = _index_vector("capture.row", capture.row, B)
        cks = _index_vector("capture.key_start", capture.key_start, B)

    if _compiling():
        # Values cannot be read while tracing: assert the same conditions on the device.
        if knockout is not None:
            _assert_span("knockout.key_start", ks, keep.shape[1], Sk)
            torch._assert_async(((qs >= 0) & (qe <= Sk) & (qs <= qe)).all(),
                                f"knockout.query_start/query_end: expected 0 <= query_start <= query_end <= Sk={Sk}")
        if capture is not None:
            if length_t is not None:
                raise ValueError("capture.length: pass a Python int under torch.compile, not a tensor")
            if length < 0:
                raise ValueError(f"capture.length: expected a non-negative int, got {length!r}")
            torch._assert_async(((row >= Sk - Sq) & (row < Sk)).all(),
                                f"capture.row: expected positions in this call's query block [{Sk - Sq}, {Sk})")
            _assert_span("capture.key_start", cks, length, Sk)
    else:
        # Every value the checks need, in one host read (one synchronisation at most).
        vecs = ([qs, qe, ks] if knockout is not None else []) + ([row, cks] if capture is not None else [])
        if capture is not None and length_t is not None:
            vecs.append(length_t)
        vals = _read_once(vecs)
        if capture is not None and length_t is not None:
            length = vals.pop()[0]
        if knockout is not None:
            qs_h, qe_h, ks_h = vals[:3]
            vals = vals[3:]
            _check_span("knockout.key_start", ks_h, keep.shape[1], Sk)
            if B and (min(qs_h) < 0 or max(qe_h) > Sk or any(a > b for a, b in zip(qs_h, qe_h))):
                raise ValueError(
                    f"knockout.query_start/query_end: expected 0 <= query_start <= query_end <= Sk={Sk}, "
                    f"got query_start={qs_h}, query_end={qe_h}"
                )
        if capture is not None:
            if length < 0:
                raise ValueError(f"capture.length: expected a non-negative int, got {capture.length!r}")
            row_h, cks_h = vals
            if B and (min(row_h) < Sk - Sq or max(row_h) >= Sk):
                raise ValueError(
                    f"capture.row: expected positions in this call's query block [{Sk - Sq}, {Sk}) "
                    f"(Sq={Sq}, Sk={Sk}), got {row_h}"
                )
            _check_span("capture.key_start", cks_h, length, Sk)
    if knockout is not None:
        dev = q.device
        ko = Knockout(_to_device(qs, dev), _to_device(qe, dev), _to_device(ks, dev), _to_device(keep, dev),
                      knockout.mode)
    if capture is not None:
        cap = Capture(_to_device(row, q.device), _to_device(cks, q.device), int(length))

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
    if isinstance(length, bool) or not isinstance(length, (int, torch.Tensor)):
        raise ValueError(f"length: expected a non-negative int, got {length!r}")
    for name, t in (("q_row", q_row), ("k", k)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name}: the last (head) dimension must be contiguous, got strides {t.stride()}")
    ks = _index_vector("key_start", key_start, B)
    if _compiling():
        if isinstance(length, torch.Tensor):
            raise ValueError("length: pass a Python int under torch.compile, not a tensor")
        if length < 0:
            raise ValueError(f"length: expected a non-negative int, got {length!r}")
        _assert_span("key_start", ks, length, Sk)
    else:
        vecs = [ks] + ([length.reshape(1).to(torch.int64)] if isinstance(length, torch.Tensor) else [])
        vals = _read_once(vecs)
        if isinstance(length, torch.Tensor):
            length = vals[1][0]
        if length < 0:
            raise ValueError(f"length: expected a non-negative int, got {length!r}")
        _check_span("key_start", vals[0], length, Sk)
    ks = _to_device(ks, k.device)
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or tuple(keep.shape) != (B, length):
            got = _shape(keep) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"keep: expected shape ({B}, {length}) bool, got {got}")
        if keep.dtype != torch.bool:
            raise TypeError(f"keep: expected dtype torch.bool, got {keep.dtype}")
        keep = _to_device(keep, k.device)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    return CaptureFromLseArgs(q_row, k, lse_row.to(k.device, non_blocking=True), ks, int(length), scale, keep)


class MetricsArgs(NamedTuple):
    attn: torch.Tensor
    mask: torch.Tensor
    reference: Optional[torch.Tensor]
    padded: bool  # some entries of attn are NaN: tokens their row does not have


def check_metrics(attn, mask, reference) -> MetricsArgs:
    """``(attn, mask, reference)`` as tensors on attn's device, and whether attn holds NaN
    padding. Values are checked in one host read: attention must be finite and >= 0
    where present (NaN marks a token a row does not have, e.g. ``vg.maps`` beyond a
    sample's ``N``, and must lie outside the mask), the reference finite and > 0 where
    the attention is present."""
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
    mask = mask.to(attn.device, non_blocking=True)
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
        reference = reference.to(attn.device, non_blocking=True)
        try:
            rshape = torch.broadcast_shapes(attn.shape, reference.shape)
        except RuntimeError:
            raise ValueError(f"reference: shape {_shape(reference)} does not broadcast against "
                             f"attn {_shape(attn)}") from None
        if rshape != attn.shape:
            raise ValueError(f"reference: shape {_shape(reference)} would broadcast attn {_shape(attn)} "
                             f"to {tuple(rshape)}; expected it to broadcast to attn's shape")
    if torch.compiler.is_compiling() or attn.numel() == 0:
        return MetricsArgs(attn, mask, reference, False)
    nan = torch.isnan(attn)
    present = ~nan
    flags = [(attn < 0).any(), torch.isinf(attn).any(), (nan & (mask != 0)).any(), nan.any()]
    if reference is not None:
        flags += [(present & ~(reference > 0)).any(), (present & torch.isinf(reference)).any()]
    neg, inf, nan_in_mask, padded, *ref = torch.stack(flags).tolist()
    if neg:
        raise ValueError(f"attn: expected probabilities >= 0, got negative values (min {float(attn[present].min()):.4g})")
    if inf:
        raise ValueError("attn: expected finite values, got inf")
    if nan_in_mask:
        raise ValueError("attn: NaN on a ground-truth token (mask != 0); NaN may only mark tokens a row does not have "
                         "(vg.maps beyond a sample's N), outside the mask")
    if ref and (ref[0] or ref[1]):
        raise ValueError("reference: expected finite values > 0 wherever attn is present, got "
                         + ("values <= 0 or NaN" if ref[0] else "inf"))
    return MetricsArgs(attn, mask, reference, bool(padded))


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
