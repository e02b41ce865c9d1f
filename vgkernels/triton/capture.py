"""``capture_from_lse``: one attention row rebuilt from another kernel's log-sum-exp.

Layers that stay on flash-attn or SDPA return ``softmax_lse`` / ``logsumexp`` per row;
with it, the probabilities of one query row over an image span are
``p_j = exp(scale · q·k_j − lse)``, read from K in place (GQA head ``h // G``) without
running the attention again. Program ``(b·Hq + h, j-block)`` writes ``BLOCK_N`` of them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _capture_from_lse_kernel(
    QROW, K, LSE, KS, KEEP, PROBS,
    qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_lb, stride_lh,
    Hq, G, N,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KEEP: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    j_ok = offs_j < N
    qv = tl.load(QROW + b64 * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    key_start = tl.load(KS + b)
    k_ptrs = K + b64 * stride_kb + (h // G) * stride_kh + (key_start + offs_j)[:, None] * stride_kn + offs_d[None, :]
    kb = tl.load(k_ptrs, mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    # One row against BLOCK_N keys is a matrix-vector product: a float32 multiply-reduce
    # is exact enough and needs no tensor-core tile of 16 rows.
    t = tl.sum(kb * qv[None, :], 1) * qk_scale  # base-2 scores
    lse2 = tl.load(LSE + b64 * stride_lb + h * stride_lh).to(tl.float32) * 1.4426950408889634
    p = tl.math.exp2(t - lse2)
    if HAS_KEEP:
        kept = tl.load(KEEP + b64 * N + offs_j, mask=j_ok, other=0) != 0
        p = tl.where(kept, p, 0.0)
    tl.store(PROBS + (b64 * Hq + h) * N + offs_j, p, mask=j_ok)


def run_capture_from_lse(
    q_row: torch.Tensor,
    k: torch.Tensor,
    lse_row: torch.Tensor,
    key_start: torch.Tensor,
    length: int,
    scale: float,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The launch behind :func:`capture_from_lse` (the custom op's implementation)."""
    B, Hq, D = q_row.shape
    Hkv = k.shape[2]
    probs = _common.empty((B, Hq, length), torch.float32, k.device)
    if B == 0 or Hq == 0 or length == 0:
        return probs
    if D > 256:
        raise ValueError(f"q_row: backend='triton' supports head dims up to 256, got D={D}")
    block_d = _common.next_pow2(D)
    # At most 8192 float32 products per tile (64 per thread at 4 warps): no spills at D = 256.
    block_n = 16 if _common.INTERPRET else max(16, min(128, _common.next_pow2(length), 8192 // block_d))
    grid = (B * Hq, triton.cdiv(length, block_n))
    kw = {} if _common.INTERPRET else {"num_warps": 4}
    _capture_from_lse_kernel[grid](
        q_row, k, lse_row, key_start,
        _common.as_loadable(keep) if keep is not None else _common.dummy(k.device, torch.uint8),
        probs, float(scale) * _common.LOG2E,
        q_row.stride(0), q_row.stride(1), k.stride(0), k.stride(1), k.stride(2),
        lse_row.stride(0), lse_row.stride(1),
        Hq, Hq // Hkv, length,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=block_n, HAS_KEEP=keep is not None,
        **kw,
    )
    return probs


def capture_from_lse(
    q_row: torch.Tensor,
    k: torch.Tensor,
    lse_row: torch.Tensor,
    key_start: torch.Tensor,
    length: int,
    scale: float,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``probs[b, h, j] = exp(scale · q_row[b, h]·k[b, key_start[b] + j, h // G] − lse_row[b, h])``,
    times ``keep[b, j]`` when given. ``q_row (B, Hq, D)``, ``k (B, Sk, Hkv, D)``,
    ``lse_row (B, Hq)``; returns ``(B, Hq, length)`` float32 (validated arguments; no host
    sync). Traced as the custom op ``torch.ops.vgkernels_triton.capture_from_lse``.

    The formula is applied as written: an ``lse`` of ``-inf`` (a row with no key) gives
    ``inf``, as the reference does.
    """
    from . import _ops

    if _ops.traced(q_row):
        return _ops.capture_from_lse(q_row, k, lse_row, key_start, int(length), float(scale), keep)
    return run_capture_from_lse(q_row, k, lse_row, key_start, int(length), float(scale), keep)
