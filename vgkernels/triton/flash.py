"""Fused flash-attention forward with knockout, last-row capture and log-sum-exp.

Two kernels compute SPEC §2 ``attention``; both walk key blocks with an online softmax
(running max ``m``, running denominator ``l``, running numerator ``acc``) in base 2: scores
are ``t = s · log2(e)`` so that ``exp(s - lse) = 2^(t - lse₂)``, and the natural
``lse = lse₂ · ln 2`` is written at the end.

``_attn_fwd_kernel`` (query blocks): program ``(bh, m)`` owns ``BLOCK_M`` query rows of
one (batch, query head) pair and visits the key blocks in two loops, so that the causal
test is paid only on the blocks that cross the diagonal (or ``Sk``): blocks past the
diagonal of the whole query block are never visited, blocks entirely left of it skip the
test. Inside a loop, a block-uniform flag says whether the block intersects the knockout
span ``[key_start, key_start + N)`` in a program whose rows intersect
``[query_start, query_end)``; only then is ``keep`` loaded and tested.

``_attn_split_kernel`` + ``_attn_merge_kernel`` (short queries, ``Sq <= 16``: decode steps and
capture rows): the ``Sq · G`` rows that share one K/V head are packed into one tile
(row ``r = i · G + g``), the keys are split over programs (flash-decoding), each split
writes its normalised partial output and ``lse₂``, and the merge combines them:
``lse₂ = log2 Σ_s 2^(lse₂_s)``, ``out = Σ_s 2^(lse₂_s − lse₂) out_s``.

Knockout modes, per affected row and knocked key ``j``:

- ``renorm``: ``t_j = -inf`` before the online softmax (it never enters ``m``, ``l``, ``acc``);
- ``zero``: ``2^(t_j - m)`` is added to ``l`` but the numerator uses 0 for it.

Capture: the program that knows row ``capture.row[b]``'s final ``lse₂`` (the query block
that owns it, or the merge) computes that row alone over the capture span: a 1-row
``q·Kᵀ`` on the CUDA cores, ``p_j = 2^(t_j - lse₂)`` for keys allowed by causal, padding and
knockout, 0 elsewhere. It reads the span's keys once.

On sm_90 (tile ``tma=True``) Q, K and V are read through tensor descriptors (TMA) over
their 4-D ``(B, S, H, D)`` layout, which zero-fill rows past ``S`` and columns past ``D``;
elsewhere through pointers with masks. Tiles come from :mod:`vgkernels.triton.tiles`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common, tiles
from .._types import Capture, Knockout

KO_MODES = {"renorm": 1, "zero": 2}


@triton.jit
def _kv_tile(X, b, hk, n0, x_base, stride_n, offs_d, Sk,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             BOUNDED: tl.constexpr, USE_TMA: tl.constexpr):
    """Keys (or values) ``n0 .. n0 + BLOCK_N`` of head ``hk`` as a ``(BLOCK_N, BLOCK_D)`` tile;
    rows at or past ``Sk`` (when ``BOUNDED``) and columns past ``HEAD_DIM`` read as 0."""
    if USE_TMA:
        x = X.load([b, n0, hk, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ptrs = x_base + offs_n[:, None] * stride_n + offs_d[None, :]
        if BOUNDED:
            x = tl.load(ptrs, mask=(offs_n < Sk)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _knocked(keep_base, offs_n, ko_key_start, KO_N, row_knocked):
    """(rows, keys): the row is in the knockout band and the key is in the span with keep False."""
    rel = offs_n - ko_key_start
    in_span = (rel >= 0) & (rel < KO_N)
    # Keys outside the span read as kept, so `dropped` is exactly "in span and keep False".
    dropped = tl.load(keep_base + rel, mask=in_span, other=1) == 0
    return row_knocked[:, None] & dropped[None, :]


@triton.jit
def _attn_loop(
    acc, l_i, m_i, q, K, V, b, hk, k_base, v_base, stride_kn, stride_vn,
    kpm_base, keep_base, ko_key_start, KO_N, ko_lo, ko_hi, pos_m, row_knocked,
    offs_d, start, end, Sk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KO: tl.constexpr,
    KO_ZERO: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Online softmax over key blocks ``start, start + BLOCK_N, ... < end``.

    ``MASKED``: the blocks may cross the causal diagonal or ``Sk``, so both are tested.
    A block with ``n0 + BLOCK_N > ko_lo`` and ``n0 < ko_hi`` takes the knockout branch
    (``ko_lo = ko_hi = 0`` in a program no knocked row belongs to).
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        k = _kv_tile(K, b, hk, n0, k_base, stride_kn, offs_d, Sk, HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, USE_TMA)
        if UPCAST:
            k = k.to(tl.float32)
        t = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        if MASKED:
            ok = offs_n[None, :] < Sk
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= pos_m[:, None])
            t = tl.where(ok, t, float("-inf"))
        if HAS_KPM:
            real = tl.load(kpm_base + offs_n, mask=offs_n < Sk, other=0) != 0
            t = tl.where(real[None, :], t, float("-inf"))
        if HAS_KO:
            if not KO_ZERO:
                if (n0 + BLOCK_N > ko_lo) & (n0 < ko_hi):
                    t = tl.where(_knocked(keep_base, offs_n, ko_key_start, KO_N, row_knocked), float("-inf"), t)
        m_new = tl.maximum(m_i, tl.max(t, 1))
        # A row with nothing attendable so far has m_new = -inf; subtracting 0 instead keeps
        # 2^(-inf - -inf) = NaN out of p and alpha (both become exactly 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(t - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_KO:
            if KO_ZERO:
                # zero mode: the knocked key stays in the denominator l, not in the numerator.
                if (n0 + BLOCK_N > ko_lo) & (n0 < ko_hi):
                    p = tl.where(_knocked(keep_base, offs_n, ko_key_start, KO_N, row_knocked), 0.0, p)
        v = _kv_tile(V, b, hk, n0, v_base, stride_vn, offs_d, Sk, HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, USE_TMA)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _capture_row(
    q_row, lse2, K, b, hk, k_base, stride_kn, kpm_base, keep_base, ko_key_start, KO_N, cap_knocked,
    cap_row, cap_ks, p_base, CAP_N, Sk, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_KO: tl.constexpr, USE_TMA: tl.constexpr,
):
    """``p_j = 2^(t_j - lse₂)`` of one row (``q_row (BLOCK_D,)`` float32, position ``cap_row``)
    over keys ``cap_ks + j``, ``j < CAP_N``; 0 where causal, padding or knockout forbid the key.

    One row against ``BLOCK_N`` keys is a matrix-vector product, done with float32 FMAs
    (the main loop's bf16/fp16 products are exact in float32, so the scores agree with the
    ones the softmax used up to summation order)."""
    offs_j0 = tl.arange(0, BLOCK_N)
    for j0 in range(0, CAP_N, BLOCK_N):
        offs_j = j0 + offs_j0
        j_ok = offs_j < CAP_N
        offs_n = cap_ks + offs_j
        if USE_TMA:
            kb = K.load([b, cap_ks + j0, hk, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            kb = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                         mask=j_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        t = tl.sum(kb.to(tl.float32) * q_row[None, :], 1) * qk_scale
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
        # ok is empty whenever lse₂ = -inf, so the inf of 2^(t + inf) is never kept.
        p = tl.where(ok, tl.math.exp2(t - lse2), 0.0)
        tl.store(p_base + offs_j, p, mask=j_ok)


@triton.jit
def _ko_setup(KO_QS, KO_QE, KO_KS, KEEP, b, b64, KO_N, pos_m, q_lo, q_hi, HAS_KO: tl.constexpr):
    """Knockout state of a program whose rows sit at positions ``pos_m``, all in
    ``[q_lo, q_hi)``: ``(query_start, query_end, key_start, keep row pointer, which rows are
    knocked, ko_lo, ko_hi)``; ``[ko_lo, ko_hi)`` is the span when the band meets the rows,
    empty otherwise (the loop's block-uniform test)."""
    if HAS_KO:
        # Positions fit in int32 (validated < Sk); int32 keeps the key loops' arithmetic narrow.
        qs = tl.load(KO_QS + b).to(tl.int32)
        qe = tl.load(KO_QE + b).to(tl.int32)
        ko_key_start = tl.load(KO_KS + b).to(tl.int32)
        keep_base = KEEP + b64 * KO_N
        row_knocked = (pos_m >= qs) & (pos_m < qe)
        affected = (q_lo < qe) & (qs < q_hi) & (KO_N > 0)
        ko_lo = tl.where(affected, ko_key_start, 0)
        ko_hi = tl.where(affected, ko_key_start + KO_N, 0)
    else:
        qs = 0
        qe = 0
        ko_key_start = 0
        keep_base = KEEP
        row_knocked = pos_m < 0
        ko_lo = 0
        ko_hi = 0
    return qs, qe, ko_key_start, keep_base, row_knocked, ko_lo, ko_hi


@triton.jit
def _normalise(acc, l_i, m_i):
    """``(out, lse₂)`` from the online-softmax state; a row with no key gives 0 and -inf."""
    empty_row = l_i == 0.0
    lse2 = tl.where(empty_row, float("-inf"), m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i)))
    return acc / tl.where(empty_row, 1.0, l_i)[:, None], lse2


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, QP, O, LSE, KPM, KO_QS, KO_QE, KO_KS, KEEP, CAP_ROW, CAP_KS, PROBS,
    qk_scale,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    Sq, Sk, Hq, G, KO_N, CAP_N,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KO: tl.constexpr, KO_ZERO: tl.constexpr,
    HAS_CAP: tl.constexpr, NEED_LSE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr,
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

    if USE_TMA:
        q = Q.load([b, pid_m * BLOCK_M, h, 0]).reshape(BLOCK_M, BLOCK_D)
        k_base = K  # unused: loads go through the descriptors
        v_base = V
    else:
        q_ptrs = Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b64 * stride_kb + hk * stride_kh
        v_base = V + b64 * stride_vb + hk * stride_vh
    if UPCAST:
        q = q.to(tl.float32)
    kpm_base = KPM + b64 * Sk

    if CAUSAL:
        hi = q_hi  # keys beyond the last row's position are never attended
        full_end = (tl.minimum(q_lo + 1, Sk) // BLOCK_N) * BLOCK_N
    else:
        hi = Sk
        full_end = (Sk // BLOCK_N) * BLOCK_N

    qs, qe, ko_key_start, keep_base, row_knocked, ko_lo, ko_hi = _ko_setup(
        KO_QS, KO_QE, KO_KS, KEEP, b, b64, KO_N, pos_m, q_lo, q_hi, HAS_KO)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    acc, l_i, m_i = _attn_loop(
        acc, l_i, m_i, q, K, V, b, hk, k_base, v_base, stride_kn, stride_vn, kpm_base, keep_base, ko_key_start,
        KO_N, ko_lo, ko_hi, pos_m, row_knocked, offs_d, 0, full_end, Sk, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_KPM, HAS_KO, KO_ZERO, UPCAST, DOT_PREC, USE_TMA)
    acc, l_i, m_i = _attn_loop(
        acc, l_i, m_i, q, K, V, b, hk, k_base, v_base, stride_kn, stride_vn, kpm_base, keep_base, ko_key_start,
        KO_N, ko_lo, ko_hi, pos_m, row_knocked, offs_d, full_end, hi, Sk, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_KPM, HAS_KO, KO_ZERO, UPCAST, DOT_PREC, USE_TMA)

    out, lse2 = _normalise(acc, l_i, m_i)
    o_ptrs = O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if NEED_LSE:
        tl.store(LSE + (b64 * Hq + h) * Sq + offs_m, lse2 * 0.6931471805599453, mask=m_ok)

    if HAS_CAP:
        cap_row = tl.load(CAP_ROW + b).to(tl.int32)
        if (cap_row >= q_lo) & (cap_row < q_hi):
            is_row = pos_m == cap_row
            lse_row = tl.max(tl.where(is_row, lse2, float("-inf")), 0)
            # Re-read the row (QP is q's pointer even when Q is a descriptor): keeping the q
            # tile alive through the loop for one row would cost registers everywhere.
            q_row = tl.load(QP + b64 * stride_qb + (cap_row - off) * stride_qm + h * stride_qh + offs_d,
                            mask=d_ok, other=0.0).to(tl.float32)
            cap_knocked = (cap_row >= qs) & (cap_row < qe)
            _capture_row(q_row, lse_row, K, b, hk, k_base, stride_kn, kpm_base, keep_base, ko_key_start, KO_N,
                         cap_knocked, cap_row, tl.load(CAP_KS + b).to(tl.int32), PROBS + (b64 * Hq + h) * CAP_N,
                         CAP_N, Sk, offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, HAS_KPM, HAS_KO, USE_TMA)


@triton.jit
def _attn_split_kernel(
    Q, K, V, PO, PL, KPM, KO_QS, KO_QE, KO_KS, KEEP,
    qk_scale,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    B, Sq, Sk, Hq, Hkv, G, KO_N, keys_per_split,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KO: tl.constexpr, KO_ZERO: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Program ``(split, b · Hkv + hk, row block)``: packed rows ``r = i · G + g`` (query row
    ``i``, query head ``hk · G + g``) against keys ``[split · keys_per_split, …)``. Writes
    the normalised partial output ``PO[split, b, h, i]`` and its ``lse₂`` ``PL[split, b, h, i]``
    (``-inf`` for a split with no attendable key)."""
    split = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // Hkv
    hk = pid % Hkv
    b64 = b.to(tl.int64)
    offs_r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < Sq * G
    d_ok = offs_d < HEAD_DIM
    i = offs_r // G
    h = hk * G + offs_r % G
    off = Sk - Sq
    pos_m = off + i
    q = tl.load(Q + b64 * stride_qb + i[:, None] * stride_qm + h[:, None] * stride_qh + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if USE_TMA:
        k_base = K
        v_base = V
    else:
        k_base = K + b64 * stride_kb + hk * stride_kh
        v_base = V + b64 * stride_vb + hk * stride_vh
    kpm_base = KPM + b64 * Sk

    # Positions of the block's first and one past its last real row.
    q_lo = off + (tl.program_id(2) * BLOCK_M) // G
    q_hi = off + (tl.minimum((tl.program_id(2) + 1) * BLOCK_M, Sq * G) - 1) // G + 1
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, Sk)
    if CAUSAL:
        end = tl.minimum(end, q_hi)

    _, _, ko_key_start, keep_base, row_knocked, ko_lo, ko_hi = _ko_setup(
        KO_QS, KO_QE, KO_KS, KEEP, b, b64, KO_N, pos_m, q_lo, q_hi, HAS_KO)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attn_loop(
        acc, l_i, m_i, q, K, V, b, hk, k_base, v_base, stride_kn, stride_vn, kpm_base, keep_base, ko_key_start,
        KO_N, ko_lo, ko_hi, pos_m, row_knocked, offs_d, start, end, Sk, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_KPM, HAS_KO, KO_ZERO, UPCAST, DOT_PREC, USE_TMA)

    out, lse2 = _normalise(acc, l_i, m_i)
    row = ((split * B + b64) * Hq + h) * Sq + i  # (BLOCK_M,) int64 index of (split, b, h, i)
    tl.store(PO + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=r_ok[:, None])
    tl.store(PL + row, lse2, mask=r_ok)


@triton.jit
def _attn_merge_kernel(
    PO, PL, O, LSE, Q, K, KPM, KO_QS, KO_QE, KO_KS, KEEP, CAP_ROW, CAP_KS, PROBS,
    qk_scale,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_ob, stride_om, stride_oh,
    B, Sq, Sk, Hq, G, KO_N, CAP_N, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SQ: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KO: tl.constexpr, HAS_CAP: tl.constexpr,
    NEED_LSE: tl.constexpr,
):
    """Program ``b · Hq + h``: merges the splits of that head's ``Sq`` rows, writes ``out``
    and ``lse``, then the capture row of sample ``b`` for head ``h``."""
    pid = tl.program_id(0)
    b = pid // Hq
    h = pid % Hq
    b64 = b.to(tl.int64)
    offs_i = tl.arange(0, BLOCK_SQ)
    offs_d = tl.arange(0, BLOCK_D)
    i_ok = offs_i < Sq
    d_ok = offs_d < HEAD_DIM
    m = tl.full([BLOCK_SQ], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BLOCK_SQ], dtype=tl.float32)
    acc = tl.zeros([BLOCK_SQ, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_splits):
        row = ((s * B + b64) * Hq + h) * Sq + offs_i
        ls = tl.load(PL + row, mask=i_ok, other=float("-inf"))
        m_new = tl.maximum(m, ls)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(ls - m_safe)
        po = tl.load(PO + row[:, None] * BLOCK_D + offs_d[None, :], mask=i_ok[:, None], other=0.0)
        den = den * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * po
        m = m_new
    out, lse2 = _normalise(acc, den, m)
    tl.store(O + b64 * stride_ob + h * stride_oh + offs_i[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=i_ok[:, None] & d_ok[None, :])
    if NEED_LSE:
        tl.store(LSE + (b64 * Hq + h) * Sq + offs_i, lse2 * 0.6931471805599453, mask=i_ok)
    if HAS_CAP:
        off = Sk - Sq
        cap_row = tl.load(CAP_ROW + b).to(tl.int32)
        ci = cap_row - off
        lse_row = tl.max(tl.where(offs_i == ci, lse2, float("-inf")), 0)
        q_row = tl.load(Q + b64 * stride_qb + ci * stride_qm + h * stride_qh + offs_d, mask=d_ok,
                        other=0.0).to(tl.float32)
        hk = h // G
        if HAS_KO:
            ko_key_start = tl.load(KO_KS + b).to(tl.int32)
            keep_base = KEEP + b64 * KO_N
            cap_knocked = (cap_row >= tl.load(KO_QS + b).to(tl.int32)) & (cap_row < tl.load(KO_QE + b).to(tl.int32))
        else:
            ko_key_start = 0
            keep_base = KEEP
            cap_knocked = False
        _capture_row(q_row, lse_row, K, b, hk, K + b64 * stride_kb + hk * stride_kh, stride_kn, KPM + b64 * Sk,
                     keep_base, ko_key_start, KO_N, cap_knocked, cap_row, tl.load(CAP_KS + b).to(tl.int32),
                     PROBS + (b64 * Hq + h) * CAP_N, CAP_N, Sk, offs_d, qk_scale,
                     HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, HAS_KPM, HAS_KO, False)


# --------------------------------------------------------------------------- host side

def _tma_ok(*ts: torch.Tensor) -> bool:
    """Tensor descriptors need a TMA unit (sm_90 and later; the interpreter emulates them),
    a 16-byte aligned base and 16-byte multiples for every stride but the last (which is 1)."""
    if ts[0].device.type == "cuda" and tiles.arch_class(ts[0].device) != "sm90":
        return False
    for t in ts:
        es = t.element_size()
        if t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return True


def _descriptor(t: torch.Tensor, rows: int, block_d: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, block_d])


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few splits, so that tests merge several partials
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def split_plan(B: int, Hkv: int, row_blocks: int, Sk: int, block_n: int, device, num_splits: int = 0):
    """``(num_splits, keys_per_split)`` for the split-KV kernel: enough programs for about
    two per SM, each split a whole number of key blocks, no split empty."""
    n_blocks = triton.cdiv(Sk, block_n)
    if num_splits <= 0:
        base = max(1, B * Hkv * row_blocks)
        num_splits = triton.cdiv(2 * _sm_count(device), base)
    num_splits = max(1, min(int(num_splits), n_blocks))
    per = triton.cdiv(n_blocks, num_splits) * block_n
    return triton.cdiv(Sk, per), per


def run_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
    key_padding_mask: Optional[torch.Tensor],
    ko_query_start: Optional[torch.Tensor], ko_query_end: Optional[torch.Tensor],
    ko_key_start: Optional[torch.Tensor], ko_keep: Optional[torch.Tensor], ko_mode: int,
    cap_row: Optional[torch.Tensor], cap_key_start: Optional[torch.Tensor], cap_length: int,
    need_lse: bool, *, tile: Optional[tiles.Tile] = None, num_splits: int = 0,
):
    """The launches behind :func:`attention`, on flat arguments (the custom op's schema).

    Always returns three tensors: ``out``, ``lse (B, Hq, Sq)`` (or an empty ``(0,)`` when
    neither ``need_lse`` nor a capture asks for it) and ``probs (B, Hq, cap_length)`` (an
    empty ``(0,)`` without a capture). ``ko_mode``: 0 none, 1 renorm, 2 zero.
    """
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if D > 256:
        raise ValueError(f"q: backend='triton' supports head dims up to 256, got D={D}")
    dev = q.device
    out_dtype = q.dtype
    if q.dtype == torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    out = _common.empty((B, Sq, Hq, D), q.dtype, dev)
    has_cap = cap_row is not None
    lse_store = need_lse or has_cap
    lse = _common.empty((B, Hq, Sq), torch.float32, dev) if lse_store else _common.empty((0,), torch.float32, dev)
    probs = _common.empty((B, Hq, cap_length), torch.float32, dev) if has_cap else _common.empty((0,), torch.float32, dev)
    if B == 0 or Sq == 0 or Hq == 0:
        # Nothing to launch; a zero-length capture span has nothing to write either.
        probs.zero_()
        return _finish(out, out_dtype), lse, probs
    if has_cap and cap_length == 0:
        probs.zero_()
        has_cap = False

    has_ko = ko_mode != 0
    ko_n = ko_keep.shape[1] if has_ko else 0
    dmy = _common.dummy(dev)
    dmy_u8 = _common.dummy(dev, torch.uint8)
    dmy_f = _common.dummy(dev, torch.float32)
    block_d = max(16, _common.next_pow2(D))
    common = dict(
        KPM=_common.as_loadable(key_padding_mask) if key_padding_mask is not None else dmy_u8,
        KO_QS=ko_query_start if has_ko else dmy,
        KO_QE=ko_query_end if has_ko else dmy,
        KO_KS=ko_key_start if has_ko else dmy,
        KEEP=_common.as_loadable(ko_keep) if has_ko and ko_n else dmy_u8,
        qk_scale=float(scale) * _common.LOG2E,
        stride_qb=q.stride(0), stride_qm=q.stride(1), stride_qh=q.stride(2),
        stride_kb=k.stride(0), stride_kn=k.stride(1), stride_kh=k.stride(2),
        Sq=Sq, Sk=Sk, Hq=Hq, G=Hq // Hkv, KO_N=ko_n,
        HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None, HAS_KO=has_ko,
    )
    kv_common = dict(
        stride_vb=v.stride(0), stride_vn=v.stride(1), stride_vh=v.stride(2),
        KO_ZERO=ko_mode == 2, UPCAST=_common.UPCAST_DOT,
        # float32 inputs: three TF32 products per dot (tf32x3) keep ~float32 accuracy on
        # tensor cores; plain "ieee" dots compile to FMA loops that spill heavily on sm_90.
        DOT_PREC="tf32x3" if q.dtype == torch.float32 else "tf32",
    )
    cap = dict(CAP_ROW=cap_row if has_cap else dmy, CAP_KS=cap_key_start if has_cap else dmy,
               PROBS=probs if has_cap else dmy_f, CAP_N=cap_length if has_cap else 0, HAS_CAP=has_cap)
    gpu = not _common.INTERPRET

    if Sq <= tiles.SHORT_QUERY_MAX:
        t = tile or tiles.lookup("attn_split", dev, D, q.dtype, has_ko)
        G = Hq // Hkv
        rows = Sq * G
        bm = min(t.block_m, max(16, _common.next_pow2(rows)))
        row_blocks = triton.cdiv(rows, bm)
        n_splits, per = split_plan(B, Hkv, row_blocks, Sk, t.block_n, dev, num_splits)
        use_tma = t.tma and _tma_ok(k, v)
        po = _common.empty((n_splits, B, Hq, Sq, block_d), torch.float32, dev)
        pl = _common.empty((n_splits, B, Hq, Sq), torch.float32, dev)
        kw = dict(common, **kv_common)
        kw.update(
            Q=q, K=_descriptor(k, t.block_n, block_d) if use_tma else k,
            V=_descriptor(v, t.block_n, block_d) if use_tma else v, PO=po, PL=pl,
            B=B, Hkv=Hkv, keys_per_split=per, BLOCK_M=bm, BLOCK_N=t.block_n, USE_TMA=use_tma,
        )
        if gpu:  # tiles of fewer than 64 rows (a decode step: 16) take at most 4 warps
            kw.update(num_warps=t.num_warps if bm >= 64 else min(4, t.num_warps), num_stages=t.num_stages)
        _attn_split_kernel[(n_splits, B * Hkv, row_blocks)](**kw)
        mk = dict(common, **cap)
        mk.update(PO=po, PL=pl, O=out, LSE=lse if lse_store else dmy_f, Q=q, K=k,
                  stride_ob=out.stride(0), stride_om=out.stride(1), stride_oh=out.stride(2),
                  B=B, n_splits=n_splits, BLOCK_SQ=_common.next_pow2(Sq),
                  BLOCK_N=max(16, min(_common.next_pow2(cap_length), 8192 // block_d)), NEED_LSE=lse_store)
        if gpu:
            mk.update(num_warps=4)
        _attn_merge_kernel[(B * Hq,)](**mk)
        return _finish(out, out_dtype), lse, probs

    t = tile or tiles.lookup("attn", dev, D, q.dtype, has_ko)
    bm = min(t.block_m, max(16, _common.next_pow2(Sq)))
    use_tma = t.tma and _tma_ok(q, k, v)
    kw = dict(common, **kv_common)
    kw.update(cap)
    kw.update(
        Q=_descriptor(q, bm, block_d) if use_tma else q, QP=q,
        K=_descriptor(k, t.block_n, block_d) if use_tma else k,
        V=_descriptor(v, t.block_n, block_d) if use_tma else v,
        O=out, LSE=lse if lse_store else dmy_f,
        stride_ob=out.stride(0), stride_om=out.stride(1), stride_oh=out.stride(2),
        BLOCK_M=bm, BLOCK_N=t.block_n, NEED_LSE=lse_store, USE_TMA=use_tma,
    )
    if gpu:
        kw.update(num_warps=t.num_warps if bm >= 64 else 4, num_stages=t.num_stages)
    _attn_fwd_kernel[(B * Hq, triton.cdiv(Sq, bm))](**kw)
    return _finish(out, out_dtype), lse, probs


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
    tile: Optional[tiles.Tile] = None,
    num_splits: int = 0,
):
    """Backend entry of SPEC §2 ``attention`` (arguments already validated; no host sync).

    ``q (B, Sq, Hq, D)``, ``k, v (B, Sk, Hkv, D)``, last dim contiguous, D <= 256.
    Returns ``(out (B, Sq, Hq, D) q.dtype, lse (B, Hq, Sq) float32 | None,
    probs (B, Hq, N) float32 | None)``. Calls with ``Sq <= 16`` take the split-KV kernels.

    ``tile`` forces a tile shape and ``num_splits`` the number of key splits of the
    short-query path (tests use them to put block edges where they want; a traced call
    ignores them). Under ``torch.compile`` the call is the custom op
    ``torch.ops.vgkernels_triton.attention`` (see :mod:`vgkernels.triton._ops`).

    float64 inputs are computed in float32 (the kernel's accumulators are float32 anyway)
    and returned as float64.
    """
    ko = knockout
    ko_args = (ko.query_start, ko.query_end, ko.key_start, ko.keep, KO_MODES[ko.mode]) if ko is not None \
        else (None, None, None, None, 0)
    cap_args = (capture.row, capture.key_start, int(capture.length)) if capture is not None else (None, None, 0)
    args = (q, k, v, bool(causal), float(scale), key_padding_mask, *ko_args, *cap_args, bool(need_lse))
    from . import _ops

    if _ops.traced(q):
        out, lse, probs = _ops.attention(*args)
    else:
        out, lse, probs = run_attention(*args, tile=tile, num_splits=num_splits)
    return out, (lse if need_lse else None), (probs if capture is not None else None)


def _finish(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out if out.dtype == dtype else out.to(dtype)
