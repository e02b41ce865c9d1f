"""Public kernel entry points (SPEC §2-§3): validate once, then dispatch."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import _dispatch
from ._types import AttentionResult, Capture, GroundingMetrics, Knockout
from ._validate import check_attention, check_capture_from_lse, check_metrics


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    knockout: Optional[Knockout] = None,
    capture: Optional[Capture] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, AttentionResult]:
    """Flash-attention-layout attention with knockout and last-row capture.

    ``q (B, Sq, Hq, D)``, ``k, v (B, Sk, Hkv, D)`` with ``Hq % Hkv == 0``; query row
    ``i`` sits at absolute position ``Sk - Sq + i``. Scores are
    ``s_ij = softmax_scale · q_i·k_j`` over keys allowed by ``causal`` (``j <= pos_i``)
    and ``key_padding_mask`` (``(B, Sk)`` bool, True = real token).

    ``knockout`` (:class:`Knockout`) removes the image keys whose ``keep`` is False from
    the rows in ``[query_start, query_end)``: ``renorm`` masks their scores to -inf
    before the softmax; ``zero`` zeroes their probabilities after it, without
    renormalising. ``capture`` (:class:`Capture`) returns the probabilities actually
    applied in one row over an image span, ``(B, Hq, N)`` float32.

    Returns ``out (B, Sq, Hq, D)`` in ``q.dtype``, or :class:`AttentionResult`
    ``(out, lse (B, Hq, Sq) float32, probs | None)`` when ``capture`` or ``return_lse``
    is given. A row with no attendable key gives zeros and ``lse = -inf``.
    """
    args = check_attention(q, k, v, causal, softmax_scale, key_padding_mask, knockout, capture)
    mod = _dispatch.get(backend, q.device, "attention")
    need_lse = return_lse or capture is not None
    out, lse, probs = mod.attention(
        args.q, args.k, args.v, args.causal, args.scale, args.key_padding_mask, args.knockout, args.capture, need_lse
    )
    if not need_lse:
        return out
    return AttentionResult(out, lse, probs)


def capture_from_lse(
    q_row: torch.Tensor,
    k: torch.Tensor,
    lse_row: torch.Tensor,
    key_start,
    length: int,
    *,
    softmax_scale: Optional[float] = None,
    keep: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Rebuild one row's probabilities from a log-sum-exp another kernel returned.

    ``probs[b, h, j] = exp(scale · q_row[b, h]·k[b, key_start[b] + j, h // G] − lse_row[b, h])``,
    times ``keep[b, j]`` when given. ``q_row (B, Hq, D)``, ``k (B, Sk, Hkv, D)``,
    ``lse_row (B, Hq)`` (flash-attn's ``softmax_lse`` or SDPA's logsumexp, natural log,
    of the scaled scores). Returns ``(B, Hq, length)`` float32.
    """
    a = check_capture_from_lse(q_row, k, lse_row, key_start, length, softmax_scale, keep)
    mod = _dispatch.get(backend, k.device, "capture_from_lse")
    return mod.capture_from_lse(a.q_row, a.k, a.lse_row, a.key_start, a.length, a.scale, a.keep)


def grounding_metrics(
    attn: torch.Tensor,
    mask: torch.Tensor,
    *,
    reference: Optional[torch.Tensor] = None,
    eps: float = 1e-12,
    backend: str = "auto",
) -> GroundingMetrics:
    """AR, KL and JS of attention maps against ground-truth token masks (SPEC §3).

    ``attn (..., N) >= 0``; ``mask`` bool or 0/1 and ``reference`` (> 0) broadcast to
    ``attn``. With ``a = attn / reference`` (or ``attn``), ``m = mask``,
    ``Â = a/Σa``, ``M̂ = m/Σm``:

    - ``AR = (Σ a·m / Σm) / (Σa / N)`` (uniform attention gives 1)
    - ``KL = Σ_{M̂>0} M̂ (log M̂ − log max(Â, eps))``
    - ``JS = ½ Σ Â log(Â/R) + ½ Σ M̂ log(M̂/R)``, ``R = (Â+M̂)/2``, in ``[0, ln 2]``

    Each row is normalised on its own; a row with ``Σm = 0`` or ``Σa = 0`` is NaN.
    NaN in ``attn`` marks a token its row does not have (``vg.maps`` pads a batch of
    different image sizes with NaN): it must lie outside the mask and counts in no sum
    and not in ``N``. Negative or infinite attention, NaN on a mask token, and a
    reference that is not finite and > 0 where attention is present raise ``ValueError``
    (one host read for all the checks).
    Returns :class:`GroundingMetrics` of float32 tensors shaped ``attn.shape[:-1]``.
    """
    args = check_metrics(attn, mask, reference)
    attn, mask, reference = args.attn, args.mask, args.reference
    mod = _dispatch.get(backend, attn.device, "grounding_metrics")
    if not args.padded:
        return mod.grounding_metrics(attn, mask, reference, float(eps))
    # NaN marks tokens a row does not have: they leave every sum (zero attention, reference
    # 1) and the row's N, which only AR reads: AR over the present tokens is
    # AR(zero-filled) * N_present / N.
    present = ~torch.isnan(attn)
    res = mod.grounding_metrics(torch.where(present, attn, 0.0), mask, None if reference is None else
                                torch.where(present, reference, 1.0), float(eps))
    frac = present.sum(-1).to(torch.float32) / attn.shape[-1]
    return GroundingMetrics(res.ar * frac, res.kl, res.js)
