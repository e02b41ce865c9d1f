"""Grounding metrics (SPEC §3) as one reduction kernel over ``(rows, N)``.

Per row, with ``a = attn / reference`` (or ``attn``) and ``m = mask``::

    S_a = Σ a,  S_m = Σ m,  S_am = Σ a·m,  Â = a / S_a,  M̂ = m / S_m
    AR = (S_am / S_m) / (S_a / N)
    KL = Σ_{M̂>0} M̂ (log M̂ − log max(Â, eps))
    JS = ½ Σ_{Â>0} Â log(Â / R) + ½ Σ_{M̂>0} M̂ log(M̂ / R),   R = (Â + M̂) / 2

KL and JS need the sums before the terms, so a row takes two sweeps; when the row fits in
one tile (N <= 4096) the tile stays in registers and memory is read once. Longer rows loop
over column tiles of 2048 (the second sweep mostly re-reads from L2); a single tile of
16384 columns would spill ~2 KB of stack per thread on sm_90. Rows whose
``S_a`` or ``S_m`` is 0 (or NaN) give NaN in all three.

Program ``p`` owns ``BLOCK_R`` rows. Row ``r`` is decomposed into up to four leading
indices, and each input has its own strides for them, so a mask or reference that
broadcasts against ``attn`` (stride 0 on the broadcast axes) is read in place, never
materialised. With ``head_mean`` the ``H`` maps of axis -2 are averaged first
(``A^ℓ = mean_h α^{ℓ,h}``, the per-layer figure), then divided by the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from .._types import GroundingMetrics

_MAX_ROW_DIMS = 4
_MAX_SINGLE_TILE = 4096
_LOOP_TILE = 2048


@triton.jit
def _row_offset(rows, size1, size2, size3, s0, s1, s2, s3):
    i3 = rows % size3
    t = rows // size3
    i2 = t % size2
    t = t // size2
    i1 = t % size1
    i0 = t // size1
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3


@triton.jit
def _load_tile(A, M, R, offa, offm, offr, cols, ok, san, smn, srn, sah, H, inv_h,
               HAS_REF: tl.constexpr, HEAD_MEAN: tl.constexpr):
    if HEAD_MEAN:
        a = tl.zeros(ok.shape, dtype=tl.float32)
        for hh in range(H):
            a += tl.load(A + offa[:, None] + hh * sah + cols[None, :] * san, mask=ok, other=0.0).to(tl.float32)
        a = a * inv_h
    else:
        a = tl.load(A + offa[:, None] + cols[None, :] * san, mask=ok, other=0.0).to(tl.float32)
    if HAS_REF:
        a = a / tl.load(R + offr[:, None] + cols[None, :] * srn, mask=ok, other=1.0).to(tl.float32)
    m = tl.load(M + offm[:, None] + cols[None, :] * smn, mask=ok, other=0).to(tl.float32)
    return a, m


@triton.jit
def _terms(a, m, sa, sm, eps):
    """Element-wise KL summand and sum of the two JS summands (zero-weight terms are 0)."""
    # A zero sum makes the row NaN at the end anyway; dividing by 1 instead keeps the
    # intermediate 0/0 quiet.
    ah = a / tl.where(sa == 0.0, 1.0, sa)[:, None]
    mh = m / tl.where(sm == 0.0, 1.0, sm)[:, None]
    m_pos = mh > 0
    a_pos = ah > 0
    log_mh = tl.log(tl.where(m_pos, mh, 1.0))
    log_ah = tl.log(tl.where(a_pos, ah, 1.0))
    log_r = tl.log(tl.where(a_pos | m_pos, 0.5 * (ah + mh), 1.0))
    kl = tl.where(m_pos, mh * (log_mh - tl.log(tl.maximum(ah, eps))), 0.0)
    js = tl.where(a_pos, ah * (log_ah - log_r), 0.0) + tl.where(m_pos, mh * (log_mh - log_r), 0.0)
    return kl, js


@triton.jit
def _metrics_kernel(
    A, M, R, AR, KL, JS,
    n_rows, N, H, inv_h, eps,
    size1, size2, size3,
    sa0, sa1, sa2, sa3, sah, san,
    sm0, sm1, sm2, sm3, smn,
    sr0, sr1, sr2, sr3, srn,
    HAS_REF: tl.constexpr, HEAD_MEAN: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < n_rows
    offa = _row_offset(rows, size1, size2, size3, sa0, sa1, sa2, sa3)
    offm = _row_offset(rows, size1, size2, size3, sm0, sm1, sm2, sm3)
    offr = _row_offset(rows, size1, size2, size3, sr0, sr1, sr2, sr3)
    cols0 = tl.arange(0, BLOCK_N)
    if SINGLE:
        ok = r_ok[:, None] & (cols0 < N)[None, :]
        a, m = _load_tile(A, M, R, offa, offm, offr, cols0, ok, san, smn, srn, sah, H, inv_h, HAS_REF, HEAD_MEAN)
        sa = tl.sum(a, 1)
        sm = tl.sum(m, 1)
        sam = tl.sum(a * m, 1)
        kl_t, js_t = _terms(a, m, sa, sm, eps)
        kl = tl.sum(kl_t, 1)
        js = 0.5 * tl.sum(js_t, 1)
    else:
        # Element-wise accumulators, reduced once after each sweep (a reduction per
        # iteration into a loop-carried row vector trips Triton's thread-locality pass).
        acc_a = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        acc_m = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        acc_am = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + cols0
            ok = r_ok[:, None] & (cols < N)[None, :]
            a, m = _load_tile(A, M, R, offa, offm, offr, cols, ok, san, smn, srn, sah, H, inv_h, HAS_REF, HEAD_MEAN)
            acc_a += a
            acc_m += m
            acc_am += a * m
        sa = tl.sum(acc_a, 1)
        sm = tl.sum(acc_m, 1)
        sam = tl.sum(acc_am, 1)
        acc_kl = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        acc_js = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + cols0
            ok = r_ok[:, None] & (cols < N)[None, :]
            a, m = _load_tile(A, M, R, offa, offm, offr, cols, ok, san, smn, srn, sah, H, inv_h, HAS_REF, HEAD_MEAN)
            kl_t, js_t = _terms(a, m, sa, sm, eps)
            acc_kl += kl_t
            acc_js += js_t
        kl = tl.sum(acc_kl, 1)
        js = 0.5 * tl.sum(acc_js, 1)
    # `x != x` is the NaN test: a NaN sum makes the row as undefined as a zero one.
    bad = (sa == 0.0) | (sm == 0.0) | (sa != sa) | (sm != sm)
    ar = (sam / tl.where(bad, 1.0, sm)) / (tl.where(bad, 1.0, sa) / N)
    nan = float("nan")
    tl.store(AR + rows, tl.where(bad, nan, ar), mask=r_ok)
    tl.store(KL + rows, tl.where(bad, nan, kl), mask=r_ok)
    tl.store(JS + rows, tl.where(bad, nan, js), mask=r_ok)


def _collapse(sizes: list[int], strides: list[list[int]]):
    """Merge adjacent row axes that every tensor walks contiguously, drop size-1 axes.

    ``sizes`` are the leading (row) sizes, ``strides[t]`` the strides of tensor ``t`` on
    them. Returns the reduced ``(sizes, strides)``.
    """
    dims = [(s, [st[i] for st in strides]) for i, s in enumerate(sizes) if s != 1]
    merged: list = []
    for s, st in dims:
        if merged:
            ps, pst = merged[-1]
            if all(pst[t] == st[t] * s for t in range(len(st))):
                merged[-1] = (ps * s, st)
                continue
        merged.append((s, st))
    out_sizes = [s for s, _ in merged]
    out_strides = [[st[t] for _, st in merged] for t in range(len(strides))]
    return out_sizes, out_strides


def _broadcast_to(name: str, t: torch.Tensor, shape: torch.Size, attn_shape, head_mean: bool) -> torch.Tensor:
    if head_mean and t.dim() == len(attn_shape) and t.shape[-2] == 1:
        t = t.squeeze(-2)  # a mask written against (..., H, N) with H broadcast
    try:
        return t.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"{name}: shape {tuple(t.shape)} does not broadcast to the head-mean maps' shape {tuple(shape)} "
            f"(attn {tuple(attn_shape)} averaged over axis -2)"
        ) from None


def grounding_metrics(
    attn: torch.Tensor,
    mask: torch.Tensor,
    reference: Optional[torch.Tensor] = None,
    eps: float = 1e-12,
    *,
    head_mean: bool = False,
    block_n: Optional[int] = None,
) -> GroundingMetrics:
    """Backend entry of SPEC §3 ``grounding_metrics`` (arguments already validated; no host
    sync). Traced as the custom op ``torch.ops.vgkernels_triton.grounding_metrics``.

    ``attn (..., N)``; ``mask`` and ``reference`` broadcast to it. Returns float32
    ``GroundingMetrics`` shaped ``attn.shape[:-1]``.

    ``head_mean=True`` (Triton-only extra): ``attn (..., H, N)`` is averaged over axis -2
    first, ``mask``/``reference`` broadcast to ``attn.shape[:-2] + (N,)`` (a size-1 axis -2
    is accepted), and the result is shaped ``attn.shape[:-2]``. ``block_n`` forces the
    column tile (tests use it to exercise the two-sweep path).
    """
    from . import _ops

    if _ops.traced(attn):
        return GroundingMetrics(*_ops.grounding_metrics(attn, mask, reference, float(eps), bool(head_mean),
                                                        int(block_n or 0)))
    return run_grounding_metrics(attn, mask, reference, float(eps), bool(head_mean), block_n)


def run_grounding_metrics(attn, mask, reference, eps, head_mean, block_n) -> GroundingMetrics:
    """The launch behind :func:`grounding_metrics` (the custom op's implementation)."""
    if head_mean:
        if attn.dim() < 2:
            raise ValueError(f"attn: head_mean needs shape (..., H, N), got {tuple(attn.shape)}")
        H = attn.shape[-2]
        out_shape = attn.shape[:-2]
    else:
        H = 1
        out_shape = attn.shape[:-1]
    N = attn.shape[-1]
    row_shape = torch.Size(out_shape) + (N,)
    m = _broadcast_to("mask", mask, row_shape, attn.shape, head_mean)
    ref = _broadcast_to("reference", reference, row_shape, attn.shape, head_mean) if reference is not None else None
    dev = attn.device
    ar = _common.empty(out_shape, torch.float32, dev)
    kl = _common.empty(out_shape, torch.float32, dev)
    js = _common.empty(out_shape, torch.float32, dev)
    n_rows = ar.numel()
    if n_rows == 0:
        return GroundingMetrics(ar, kl, js)
    if N == 0 or H == 0:
        # Empty rows have Σm = 0: NaN, as SPEC §3 says for every such row.
        for t in (ar, kl, js):
            t.fill_(float("nan"))
        return GroundingMetrics(ar, kl, js)

    m = _common.as_loadable(m)
    ref_t = ref if ref is not None else _common.dummy(dev, torch.float32)
    lead = list(out_shape)
    a_lead = [attn.stride(i) for i in range(len(lead))]
    m_lead = [m.stride(i) for i in range(len(lead))]
    r_lead = [ref.stride(i) for i in range(len(lead))] if ref is not None else [0] * len(lead)
    sizes, (sa_, sm_, sr_) = _collapse(lead, [a_lead, m_lead, r_lead])
    if len(sizes) > _MAX_ROW_DIMS:
        # More than four non-mergeable row axes: lay the inputs out plainly (this copies a
        # broadcast mask, which is the rare case the strided path cannot express).
        attn = attn.contiguous()
        m = m.contiguous()
        ref_t = ref_t.contiguous() if ref is not None else ref_t
        return _launch_flat(attn, m, ref_t if ref is not None else None, eps, head_mean, block_n,
                            N, H, ar, kl, js)
    pad = _MAX_ROW_DIMS - len(sizes)
    sizes = [1] * pad + sizes
    sa_, sm_, sr_ = ([0] * pad + s for s in (sa_, sm_, sr_))
    _launch(attn, m, ref_t, ref is not None, eps, head_mean, block_n, n_rows, N, H,
            sizes, sa_, sm_, sr_, attn.stride(-1), m.stride(-1), ref.stride(-1) if ref is not None else 0,
            attn.stride(-2) if head_mean else 0, ar, kl, js)
    return GroundingMetrics(ar, kl, js)


def _launch_flat(attn, m, ref, eps, head_mean, block_n, N, H, ar, kl, js):
    """Contiguous inputs: rows are one flat axis."""
    n_rows = ar.numel()
    if head_mean:
        a2 = attn.reshape(n_rows, H, N)
        sa_lead, sah = a2.stride(0), a2.stride(1)
    else:
        a2 = attn.reshape(n_rows, N)
        sa_lead, sah = a2.stride(0), 0
    m2 = m.reshape(n_rows, N)
    r2 = ref.reshape(n_rows, N) if ref is not None else _common.dummy(attn.device, torch.float32)
    zeros = [0, 0, 0]
    _launch(a2, m2, r2, ref is not None, eps, head_mean, block_n, n_rows, N, H, [1, 1, 1, n_rows],
            zeros + [sa_lead], zeros + [m2.stride(0)], zeros + [r2.stride(0) if ref is not None else 0],
            a2.stride(-1), m2.stride(-1), r2.stride(-1) if ref is not None else 0, sah, ar, kl, js)
    return GroundingMetrics(ar, kl, js)


def _launch(A, M, R, has_ref, eps, head_mean, block_n, n_rows, N, H, sizes, sa, sm, sr, san, smn, srn, sah,
            ar, kl, js):
    if block_n is None:
        block_n = max(16, _common.next_pow2(N))
        single = block_n <= _MAX_SINGLE_TILE
        if not single:
            block_n = _LOOP_TILE
    else:
        single = block_n >= N
    if _common.INTERPRET:
        # Bigger row tiles mean fewer interpreted programs; the numpy ops stay vectorised.
        block_r = max(1, min(64, 8192 // block_n))
        kw = {}
    else:
        # One row per program on the column-loop path: its element-wise accumulators
        # double the live registers (~110 at 2048 columns, 8 warps, no spills).
        block_r = max(1, min(32, 4096 // block_n)) if single else 1
        elems = block_r * block_n
        kw = {"num_warps": 16 if elems >= 16384 else (8 if elems >= 4096 else 4)}
    grid = (triton.cdiv(n_rows, block_r),)
    _metrics_kernel[grid](
        A, M, R, ar, kl, js,
        n_rows, N, H, 1.0 / H, float(eps),
        sizes[1], sizes[2], sizes[3],
        sa[0], sa[1], sa[2], sa[3], sah, san,
        sm[0], sm[1], sm[2], sm[3], smn,
        sr[0], sr[1], sr[2], sr[3], srn,
        HAS_REF=has_ref, HEAD_MEAN=head_mean, SINGLE=single, BLOCK_R=block_r, BLOCK_N=block_n, **kw,
    )
