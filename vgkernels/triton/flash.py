"""Fused flash-attention forward with knockout, last-row capture and log-sum-exp.

One launch computes SPEC §2 ``attention``. Program ``(bh, m)`` owns ``BLOCK_M`` query rows
of one (batch, query head) pair and walks the key blocks with an online softmax
(running max ``m``, running denominator ``l``, running numerator ``acc``), in base 2:
scores are ``t = s · log2(e)`` so that ``exp(s - lse) = 2^(t - lse₂)``, and the natural
``lse = lse₂ · ln 2`` is written at the end.

Key blocks are visited in up to five *segments* so that each mask is paid only where it
can act (FlexAttention's idea of full versus partial blocks, decided here from ranges):

- blocks past the causal diagonal of the whole query block are never visited;
- blocks entirely left of the diagonal and inside ``[0, Sk)`` skip the causal test;
- the knockout (``keep`` load and test) runs only on blocks that intersect the image span
  ``[key_start, key_start + N)``, and only in programs whose query block intersects
  ``[query_start, query_end)``; every other block compiles to the plain loop.

Knockout modes, per affected row and knocked key ``j``:

- ``renorm``: ``t_j = -inf`` before the online softmax (it never enters ``m``, ``l``, ``acc``);
- ``zero``: ``2^(t_j - m)`` is added to ``l`` but the numerator uses 0 for it.

Capture: after its main loop, the program that owns row ``capture.row[b]`` knows that
row's final ``lse₂`` and makes a second sweep over the capture span only, recomputing the
scores with the same ``tl.dot`` as the main loop and writing
``p_j = 2^(t_j - lse₂)`` for keys allowed by causal, padding and knockout, 0 elsewhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from .._types import Capture, Knockout


@triton.jit
def _attn_segment(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kn, stride_vn,
    kpm_base, keep_base, ko_key_start, KO_N,
    pos_m, row_knocked,
    offs_d, start, end, Sk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, APPLY_KO: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, KO_ZERO: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Online softmax over key blocks ``start, start + BLOCK_N, ... < end``.

    ``MASKED``: the blocks may cross the causal diagonal or ``Sk``, so both are tested.
    ``APPLY_KO``: the blocks intersect the knockout span and this query block is affected.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        if MASKED:
            n_ok = offs_n < Sk
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                         mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None])
        else:
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        t = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 scores
        if MASKED:
            ok = offs_n[None, :] < Sk
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= pos_m[:, None])
            t = tl.where(ok, t, float("-inf"))
        if HAS_KPM:
            real = tl.load(kpm_base + offs_n, mask=offs_n < Sk, other=0) != 0
            t = tl.where(real[None, :], t, float("-inf"))
        if APPLY_KO:
            rel = offs_n - ko_key_start
            in_span = (rel >= 0) & (rel < KO_N)
            # Keys outside the span read as kept, so `dropped` is exactly "in span and keep False".
            dropped = tl.load(keep_base + rel, mask=in_span, other=1) == 0
            knocked = row_knocked[:, None] & dropped[None, :]
            if not KO_ZERO:
                t = tl.where(knocked, float("-inf"), t)
        m_new = tl.maximum(m_i, tl.max(t, 1))
        # A row with nothing attendable so far has m_new = -inf; subtracting 0 instead keeps
        # 2^(-inf - -inf) = NaN out of p and alpha (both become exactly 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(t - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if APPLY_KO:
            if KO_ZERO:
                # zero mode: the knocked key stays in the denominator l, not in the numerator.
                p = tl.where(knocked, 0.0, p)
        if MASKED:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_range(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kn, stride_vn,
    kpm_base, keep_base, ko_key_start, KO_N,
    pos_m, row_knocked, offs_d, start, end, span_lo, span_hi, Sk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_KO: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, KO_ZERO: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Blocks in ``[start, end)``, split around the knockout blocks ``[span_lo, span_hi)``
    (all four are multiples of BLOCK_N; an unaffected program passes an empty span)."""
    if HAS_KO:
        acc, l_i, m_i = _attn_segment(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, keep_base, ko_key_start, KO_N,
            pos_m, row_knocked, offs_d, start, tl.minimum(end, span_lo), Sk, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, False, CAUSAL, HAS_KPM, KO_ZERO, UPCAST, DOT_PREC)
        acc, l_i, m_i = _attn_segment(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, keep_base, ko_key_start, KO_N,
            pos_m, row_knocked, offs_d, tl.maximum(start, span_lo), tl.minimum(end, span_hi), Sk, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, True, CAUSAL, HAS_KPM, KO_ZERO, UPCAST, DOT_PREC)
        acc, l_i, m_i = _attn_segment(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, keep_base, ko_key_start, KO_N,
            pos_m, row_knocked, offs_d, tl.maximum(start, span_hi), end, Sk, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, False, CAUSAL, HAS_KPM, KO_ZERO, UPCAST, DOT_PREC)
    else:
        acc, l_i, m_i = _attn_segment(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, keep_base, ko_key_start, KO_N,
            pos_m, row_knocked, offs_d, start, end, Sk, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, False, CAUSAL, HAS_KPM, KO_ZERO, UPCAST, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KPM, KO_QS, KO_QE, KO_KS, KEEP, CAP_ROW, CAP_KS, PROBS,
    qk_scale,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    Sq, Sk, Hq, G, KO_N, CAP_N,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KO: tl.constexpr, KO_ZERO: tl.constexpr,
    HAS_CAP: tl.constexpr, NEED_LSE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    # Query blocks in reverse: with causal attention the last blocks have the most keys
    # (and own the capture row), so they start first and the short ones fill the tail.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G  # GQA: the K/V head of this query head, read in place, never repeated
    b64 = b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM
    off = Sk - Sq  # bottom-right alignment: row i sits at position Sk - Sq + i
    pos_m = off + offs_m
    q_lo = off + pid_m * BLOCK_M  # position of the block's first row
    q_hi = tl.minimum(q_lo + BLOCK_M, Sk)  # one past the block's last real row

    q_ptrs = Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    kpm_base = KPM + b64 * Sk

    if CAUSAL:
        hi = q_hi  # keys beyond the last row's position are never attended
        full_end = (tl.minimum(q_lo + 1, Sk) // BLOCK_N) * BLOCK_N
    else:
        hi = Sk
        full_end = (Sk // BLOCK_N) * BLOCK_N

    if HAS_KO:
        # Positions fit in int32 (validated < Sk); int32 keeps the key loops' arithmetic narrow.
        qs = tl.load(KO_QS + b).to(tl.int32)
        qe = tl.load(KO_QE + b).to(tl.int32)
        ko_key_start = tl.load(KO_KS + b).to(tl.int32)
        keep_base = KEEP + b64 * KO_N
        block_affected = (q_lo < qe) & (qs < q_hi) & (KO_N > 0)
        row_knocked = (pos_m >= qs) & (pos_m < qe)
        span_lo = tl.where(block_affected, (ko_key_start // BLOCK_N) * BLOCK_N, hi)
        span_hi = tl.where(block_affected, tl.cdiv(ko_key_start + KO_N, BLOCK_N) * BLOCK_N, hi)
    else:
        ko_key_start = 0
        keep_base = KEEP
        row_knocked = offs_m < 0
        span_lo = hi
        span_hi = hi

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    acc, l_i, m_i = _attn_range(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, keep_base, ko_key_start, KO_N,
        pos_m, row_knocked, offs_d, 0, full_end, span_lo, span_hi, Sk, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_KO, CAUSAL, HAS_KPM, KO_ZERO, UPCAST, DOT_PREC)
    acc, l_i, m_i = _attn_range(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, keep_base, ko_key_start, KO_N,
        pos_m, row_knocked, offs_d, full_end, hi, span_lo, span_hi, Sk, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_KO, CAUSAL, HAS_KPM, KO_ZERO, UPCAST, DOT_PREC)

    empty_row = l_i == 0.0
    lse2 = tl.where(empty_row, float("-inf"), m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i)))
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    o_ptrs = O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if NEED_LSE:
        tl.store(LSE + (b64 * Hq + h) * Sq + offs_m, lse2 * 0.6931471805599453, mask=m_ok)

    if HAS_CAP:
        cap_row = tl.load(CAP_ROW + b).to(tl.int32)
        if (cap_row >= q_lo) & (cap_row < q_hi):
            is_row = pos_m == cap_row
            lse_row = tl.max(tl.where(is_row, lse2, float("-inf")), 0)
            cap_ks = tl.load(CAP_KS + b).to(tl.int32)
            if HAS_KO:
                cap_knocked = (cap_row >= qs) & (cap_row < qe)
            p_base = PROBS + (b64 * Hq + h) * CAP_N
            offs_n0 = tl.arange(0, BLOCK_N)
            for j0 in range(0, CAP_N, BLOCK_N):
                offs_j = j0 + offs_n0
                j_ok = offs_j < CAP_N
                offs_n = cap_ks + offs_j
                kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                             mask=d_ok[:, None] & j_ok[None, :], other=0.0)
                if UPCAST:
                    kt = kt.to(tl.float32)
                # The same dot as the main loop, so the row's scores are the ones its
                # softmax used; the other rows of the tile are discarded.
                t = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
                t_row = tl.sum(tl.where(is_row[:, None], t, 0.0), 0)
                ok = j_ok
                if CAUSAL:
                    ok = ok & (offs_n <= cap_row)
                if HAS_KPM:
                    ok = ok & (tl.load(kpm_base + offs_n, mask=j_ok, other=0) != 0)
                if HAS_KO:
                    rel = offs_n - ko_key_start
                    in_span = (rel >= 0) & (rel < KO_N)
                    dropped = tl.load(keep_base + rel, mask=in_span & j_ok, other=1) == 0
                    ok = ok & ~(dropped & cap_knocked)
                # ok is empty whenever lse_row = -inf, so the inf of 2^(t + inf) is never kept.
                p = tl.where(ok, tl.math.exp2(t_row - lse_row), 0.0)
                tl.store(p_base + offs_j, p, mask=j_ok)


def _gpu_configs(head_dim: int, sq: int, dtype: torch.dtype):
    """Tile shapes ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` worth trying on a GPU.

    Chosen from sm_90 compiles of this kernel (registers and spills per tile, read with
    cuobjdump): 16-bit inputs use wgmma-sized tiles; float32 (3xTF32 dots) needs small
    tiles to stay out of local memory; head dim 256 halves the key tile.
    """
    if dtype == torch.float32:
        cands = [(64, 32, 4, 2), (128, 32, 8, 2), (32, 32, 4, 2)]
    elif head_dim <= 64:
        cands = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)]
    elif head_dim <= 128:
        cands = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 4)]
    else:
        cands = [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2)]
    # Short query blocks (decode, Sq = 1) would waste most of a 128-row tile.
    cap_m = max(16, _common.next_pow2(sq))
    out = []
    for bm, bn, w, s in cands:
        bm = min(bm, cap_m)
        cfg = (bm, bn, w if bm >= 64 else 4, s)
        if cfg not in out:
            out.append(cfg)
    return out


_TUNED: dict = {}


def _pick_blocks(q: torch.Tensor, k: torch.Tensor, launch) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``: small fixed tiles in the interpreter
    (so that every test crosses several block edges), on a GPU the fastest of a few
    candidates, timed once per (D, dtype, Sq, Sk and B·Hq buckets, flags)."""
    if _common.INTERPRET:
        return 16, 16, 4, 1
    D = q.shape[-1]
    key = (D, q.dtype, min(_common.next_pow2(q.shape[1]), 128), _common.next_pow2(k.shape[1]),
           _common.next_pow2(q.shape[0] * q.shape[2]), launch.flags)
    hit = _TUNED.get(key)
    if hit is not None:
        return hit
    import triton.testing
    from triton.runtime.errors import OutOfResources

    best, best_ms = None, float("inf")
    for bm, bn, w, s in _gpu_configs(D, q.shape[1], q.dtype):
        try:
            ms = triton.testing.do_bench(lambda: launch(bm, bn, w, s), warmup=5, rep=20)
        except OutOfResources:  # this tile needs more shared memory than this GPU has
            continue
        if ms < best_ms:
            best, best_ms = (bm, bn, w, s), ms
    if best is None:
        raise RuntimeError(f"no tile configuration fits head dim {D} on this GPU")
    _TUNED[key] = best
    return best


class _Launch:
    """Everything a launch needs except the tile shape (so tuning can re-launch)."""

    def __init__(self, grid_args, kernel_args, flags):
        self.grid_args = grid_args
        self.kernel_args = kernel_args
        self.flags = flags

    def __call__(self, bm, bn, num_warps=4, num_stages=1):
        n_bh, Sq = self.grid_args
        grid = (n_bh, triton.cdiv(Sq, bm))
        kw = dict(self.kernel_args)
        kw.update(BLOCK_M=bm, BLOCK_N=bn)
        if not _common.INTERPRET:
            kw.update(num_warps=num_warps, num_stages=num_stages)
        _attn_fwd_kernel[grid](**kw)


def attention(
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
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
):
    """Backend entry of SPEC §2 ``attention`` (arguments already validated).

    ``q (B, Sq, Hq, D)``, ``k, v (B, Sk, Hkv, D)``, last dim contiguous, D <= 256.
    Returns ``(out (B, Sq, Hq, D) q.dtype, lse (B, Hq, Sq) float32 | None,
    probs (B, Hq, N) float32 | None)``. ``block_m``/``block_n`` force a tile shape
    (tests use them to put block edges where they want).

    float64 inputs are computed in float32 (the kernel's accumulators are float32 anyway)
    and returned as float64.
    """
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if D > 256:
        raise ValueError(f"q: backend='triton' supports head dims up to 256, got D={D}")
    dev = q.device
    out_dtype = q.dtype
    if q.dtype == torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    out = _common.empty((B, Sq, Hq, D), out_dtype if out_dtype != torch.float64 else torch.float32, dev)
    need_lse_store = need_lse or capture is not None
    lse = _common.empty((B, Hq, Sq), torch.float32, dev) if need_lse_store else None
    probs = None
    if capture is not None:
        probs = _common.empty((B, Hq, capture.length), torch.float32, dev)
    if B == 0 or Sq == 0 or Hq == 0:
        # Nothing to launch; a zero-length capture span has nothing to write either.
        if probs is not None:
            probs.zero_()
        return _finish(out, out_dtype), lse if need_lse_store else None, probs

    dmy = _common.dummy(dev)
    dmy_u8 = _common.dummy(dev, torch.uint8)
    has_kpm = key_padding_mask is not None
    has_ko = knockout is not None
    has_cap = capture is not None and capture.length > 0
    if capture is not None and capture.length == 0:
        probs.zero_()
    ko_n = knockout.keep.shape[1] if has_ko else 0
    kernel_args = dict(
        Q=q, K=k, V=v, O=out, LSE=lse if lse is not None else _common.dummy(dev, torch.float32),
        KPM=_common.as_loadable(key_padding_mask) if has_kpm else dmy_u8,
        KO_QS=knockout.query_start if has_ko else dmy,
        KO_QE=knockout.query_end if has_ko else dmy,
        KO_KS=knockout.key_start if has_ko else dmy,
        KEEP=_common.as_loadable(knockout.keep) if has_ko and ko_n else dmy_u8,
        CAP_ROW=capture.row if has_cap else dmy,
        CAP_KS=capture.key_start if has_cap else dmy,
        PROBS=probs if has_cap else _common.dummy(dev, torch.float32),
        qk_scale=float(scale) * _common.LOG2E,
        stride_qb=q.stride(0), stride_qm=q.stride(1), stride_qh=q.stride(2),
        stride_kb=k.stride(0), stride_kn=k.stride(1), stride_kh=k.stride(2),
        stride_vb=v.stride(0), stride_vn=v.stride(1), stride_vh=v.stride(2),
        stride_ob=out.stride(0), stride_om=out.stride(1), stride_oh=out.stride(2),
        Sq=Sq, Sk=Sk, Hq=Hq, G=Hq // Hkv, KO_N=ko_n, CAP_N=capture.length if has_cap else 0,
        HEAD_DIM=D, BLOCK_D=max(16, _common.next_pow2(D)),
        CAUSAL=bool(causal), HAS_KPM=has_kpm, HAS_KO=has_ko,
        KO_ZERO=bool(has_ko and knockout.mode == "zero"), HAS_CAP=has_cap, NEED_LSE=need_lse_store,
        UPCAST=_common.UPCAST_DOT,
        # float32 inputs: three TF32 products per dot (tf32x3) keep ~float32 accuracy on
        # tensor cores; plain "ieee" dots compile to FMA loops that spill heavily on sm_90.
        DOT_PREC="tf32x3" if q.dtype == torch.float32 else "tf32",
    )
    flags = (bool(causal), has_kpm, has_ko, has_cap)
    launch = _Launch((B * Hq, Sq), kernel_args, flags)
    if block_m is not None or block_n is not None:
        bm = block_m or 16
        bn = block_n or 16
        launch(bm, bn, 4, 2)
    else:
        launch(*_pick_blocks(q, k, launch))
    return _finish(out, out_dtype), (lse if need_lse else None), probs


def _finish(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out if out.dtype == dtype else out.to(dtype)
