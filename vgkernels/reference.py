"""Plain-PyTorch references of every kernel (the ``backend="torch"`` path).

They take already-validated arguments (see :mod:`vgkernels._validate`), compute in
float32 — or float64 when asked or when the input is float64 — and are the ground
truth that the Triton and CUDA kernels are tested and benchmarked against.

``attention_ref`` walks the query rows in chunks, so a call needs memory
``O(chunk · Hq · Sk)`` rather than ``O(Sq · Hq · Sk)``: an 8K-token prefill runs on a
laptop CPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._types import Capture, GroundingMetrics, Knockout


def _compute_dtype(dtype: torch.dtype, requested: Optional[torch.dtype]) -> torch.dtype:
    if requested is not None:
        return requested
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_masks(
    rows: torch.Tensor,
    Sk: int,
    causal: bool,
    key_padding_mask: Optional[torch.Tensor],
    knockout: Optional[Knockout],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Which keys each query row may attend, and which of them are knocked out.

    rows : (C,) absolute positions of the query rows.
    Returns ``allowed (B|1, C, Sk)`` — causal and padding — and ``knocked (B, C, Sk)``
    (None without a knockout): keys of the image span with ``keep`` False, for rows in
    ``[query_start, query_end)``.
    """
    keys = torch.arange(Sk, device=rows.device)
    allowed = torch.ones(1, rows.numel(), Sk, dtype=torch.bool, device=rows.device)
    if causal:
        allowed = allowed & (keys[None, None, :] <= rows[None, :, None])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    knocked = None
    if knockout is not None:
        B, N = knockout.keep.shape
        rel = keys[None, :] - knockout.key_start[:, None]  # (B, Sk) index into keep
        in_span = (rel >= 0) & (rel < N)
        dropped = torch.zeros(B, Sk, dtype=torch.bool, device=rows.device)
        if N:
            gathered = torch.gather(knockout.keep, 1, rel.clamp(0, N - 1))
            dropped = in_span & ~gathered
        affected = (rows[None, :] >= knockout.query_start[:, None]) & (rows[None, :] < knockout.query_end[:, None])
        knocked = affected[:, :, None] & dropped[:, None, :]
    return allowed, knocked


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Optional[torch.Tensor] = None,
    knockout: Optional[Knockout] = None,
    capture: Optional[Capture] = None,
    need_lse: bool = True,
    *,
    compute_dtype: Optional[torch.dtype] = None,
    chunk_size: int = 128,
):
    """Reference of SPEC §2 ``attention``.

    Shapes: ``q (B, Sq, Hq, D)``, ``k, v (B, Sk, Hkv, D)``; query row ``i`` sits at
    position ``Sk - Sq + i``. For each row with allowed keys ``A`` and knocked keys ``K``:

    - renorm: ``p_j = exp(s_j - lse) [j ∈ A \\ K]``, ``lse = log Σ_{A \\ K} exp(s_j)``
    - zero:   ``p_j = exp(s_j - lse) [j ∈ A] [j ∉ K]``, ``lse = log Σ_{A} exp(s_j)``

    with ``s_j = scale · q·k_j``; ``out = Σ_j p_j v_j``. A row with no key gives zeros
    and ``lse = -inf``.

    Returns ``(out (B, Sq, Hq, D) in q.dtype, lse (B, Hq, Sq) float32 or None,
    probs (B, Hq, N) float32 or None)``.
    """
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    cdt = _compute_dtype(q.dtype, compute_dtype)
    dev = q.device
    # (B, Hkv, Sk, D): GQA by broadcasting over the group axis, K/V are never repeated.
    kc = k.to(cdt).permute(0, 2, 1, 3)
    vc = v.to(cdt).permute(0, 2, 1, 3)
    out = torch.empty(B, Sq, Hq, D, dtype=q.dtype, device=dev)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=dev) if need_lse else None
    probs = None
    if capture is not None:
        probs = torch.zeros(B, Hq, capture.length, dtype=torch.float32, device=dev)
        cap_rows = capture.row - (Sk - Sq)  # (B,) query index of each sample's captured row
        # (B, N) key of each captured probability; gathered on the device, never read back.
        cap_keys = (capture.key_start[:, None] + torch.arange(capture.length, device=dev)[None, :]).clamp(0, Sk - 1)
    zero_mode = knockout is not None and knockout.mode == "zero"
    for r0 in range(0, Sq, chunk_size):
        r1 = min(Sq, r0 + chunk_size)
        C = r1 - r0
        rows = torch.arange(Sk - Sq + r0, Sk - Sq + r1, device=dev)
        allowed, knocked = key_masks(rows, Sk, causal, key_padding_mask, knockout)
        if knocked is not None and not zero_mode:
            allowed = allowed & ~knocked
        # (B, Hkv, G, C, D) x (B, Hkv, Sk, D) -> (B, Hkv, G, C, Sk)
        qc = q[:, r0:r1].to(cdt).reshape(B, C, Hkv, G, D).permute(0, 2, 3, 1, 4)
        s = torch.einsum("bhgcd,bhsd->bhgcs", qc, kc) * scale
        allowed5 = allowed[:, None, None]  # (B|1, 1, 1, C, Sk)
        s = s.masked_fill(~allowed5, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # -inf where no key is allowed
        # exp(-inf - -inf) is NaN: the where() keeps empty rows at exactly zero.
        p = torch.where(allowed5, torch.exp(s - row_lse[..., None]), torch.zeros((), dtype=cdt, device=dev))
        if knocked is not None and zero_mode:
            p = p.masked_fill(knocked[:, None, None], 0.0)
        o = torch.einsum("bhgcs,bhsd->bhgcd", p, vc)  # (B, Hkv, G, C, D)
        out[:, r0:r1] = o.permute(0, 3, 1, 2, 4).reshape(B, C, Hq, D).to(q.dtype)
        if lse is not None:
            lse[:, :, r0:r1] = row_lse.reshape(B, Hq, C).to(torch.float32)
        if probs is not None and capture.length:
            in_chunk = (cap_rows >= r0) & (cap_rows < r1)
            r = (cap_rows - r0).clamp(0, C - 1)
            row = p.gather(3, r[:, None, None, None, None].expand(B, Hkv, G, 1, Sk)).squeeze(3)  # (B, Hkv, G, Sk)
            span = row.gather(3, cap_keys[:, None, None, :].expand(B, Hkv, G, capture.length))
            probs = torch.where(in_chunk[:, None, None], span.reshape(B, Hq, capture.length).to(torch.float32), probs)
    return out, lse, probs


def capture_from_lse_ref(
    q_row: torch.Tensor,
    k: torch.Tensor,
    lse_row: torch.Tensor,
    key_start: torch.Tensor,
    length: int,
    scale: float,
    keep: Optional[torch.Tensor] = None,
    *,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``probs[b, h, j] = exp(scale · q_row[b, h] · k[b, key_start[b] + j, h // G] - lse_row[b, h])``
    times ``keep[b, j]`` when given. ``q_row (B, Hq, D)``, ``k (B, Sk, Hkv, D)``,
    ``lse_row (B, Hq)``. Returns ``(B, Hq, length)`` float32."""
    B, Hq, D = q_row.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    cdt = _compute_dtype(q_row.dtype, compute_dtype)
    idx = key_start[:, None] + torch.arange(length, device=k.device)[None, :]  # (B, N)
    ks = torch.gather(k, 1, idx[:, :, None, None].expand(B, length, Hkv, D)).to(cdt)  # (B, N, Hkv, D)
    qg = q_row.to(cdt).reshape(B, Hkv, G, D)
    s = torch.einsum("bhgd,bnhd->bhgn", qg, ks).reshape(B, Hq, length) * scale
    p = torch.exp(s - lse_row.to(cdt)[:, :, None])
    if keep is not None:
        p = p * keep[:, None, :].to(cdt)
    return p.to(torch.float32)


def grounding_metrics_ref(
    attn: torch.Tensor,
    mask: torch.Tensor,
    reference: Optional[torch.Tensor] = None,
    eps: float = 1e-12,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> GroundingMetrics:
    """SPEC §3 on the last axis. With ``a = attn / reference`` and ``m = mask``:

    - ``Â = a / Σa``, ``M̂ = m / Σm``
    - ``AR = (Σ a·m / Σm) / (Σa / N)``
    - ``KL = Σ_{M̂>0} M̂ (log M̂ − log max(Â, eps))``
    - ``JS = ½ Σ Â log(Â/R) + ½ Σ M̂ log(M̂/R)``, ``R = (Â + M̂)/2``, zero-weight terms 0

    A row with ``Σm = 0`` or ``Σa = 0`` is NaN in all three. Returns float32.
    """
    a = attn.to(compute_dtype)
    if reference is not None:
        a = a / reference.to(compute_dtype)
    m = mask.to(compute_dtype)
    a, m = torch.broadcast_tensors(a, m)
    N = a.shape[-1]
    sa = a.sum(-1, keepdim=True)
    sm = m.sum(-1, keepdim=True)
    ah = a / sa
    mh = m / sm
    ar = ((a * m).sum(-1) / sm[..., 0]) / (sa[..., 0] / N)
    zero = torch.zeros((), dtype=compute_dtype, device=a.device)
    pos_m = mh > 0
    kl = torch.where(pos_m, mh * (torch.log(mh) - torch.log(ah.clamp_min(eps))), zero).sum(-1)
    r = 0.5 * (ah + mh)
    # Zero-weight terms are zero by the convention 0·log 0 = 0; where() keeps the
    # NaN of log(0/0) out of the sum.
    ta = torch.where(ah > 0, ah * torch.log(ah / r), zero)
    tm = torch.where(pos_m, mh * torch.log(mh / r), zero)
    js = 0.5 * (ta.sum(-1) + tm.sum(-1))
    bad = (sa[..., 0] == 0) | (sm[..., 0] == 0) | torch.isnan(sa[..., 0]) | torch.isnan(sm[..., 0])
    nan = torch.full((), float("nan"), dtype=compute_dtype, device=a.device)
    ar, kl, js = (torch.where(bad, nan, x).to(torch.float32) for x in (ar, kl, js))
    return GroundingMetrics(ar, kl, js)
