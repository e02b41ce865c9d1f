"""The Triton entry points as ``torch.library`` custom ops (namespace ``vgkernels_triton``).

``torch.compile`` cannot trace into a Triton launch that takes Python records
(``Knockout``, ``Capture``) and allocates its outputs; as custom ops with flat tensor
arguments and fake (meta) implementations, the launches appear in a traced graph as
single nodes whose output shapes the fake functions give:

- ``attention(q, k, v, causal, scale, key_padding_mask?, ko_query_start?, ko_query_end?,
  ko_key_start?, ko_keep?, ko_mode, cap_row?, cap_key_start?, cap_length, need_lse)
  -> (out (B, Sq, Hq, D) q.dtype, lse (B, Hq, Sq) f32 | (0,), probs (B, Hq, cap_length) f32 | (0,))``
  (``ko_mode`` 0 none, 1 renorm, 2 zero; ``lse`` is empty unless ``need_lse`` or a
  capture asks for it, ``probs`` empty without a capture);
- ``capture_from_lse(q_row, k, lse_row, key_start, length, scale, keep?) -> (B, Hq, length) f32``;
- ``grounding_metrics(attn, mask, reference?, eps, head_mean, block_n) -> (ar, kl, js)`` f32
  shaped ``attn.shape[:-1]`` (``[:-2]`` with ``head_mean``).

The backend functions of :mod:`vgkernels.triton` call these while tracing (under
``torch.compile``, or with fake or other subclassed tensors) and the implementations
directly otherwise: the dispatcher costs tens of microseconds per call, which a patched
layer would pay on every decode step. Arguments are validated before (the ops do not
check them again).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import capture as _capture
from . import flash as _flash
from . import metrics as _metrics

NAMESPACE = "vgkernels_triton"


def traced(t: Tensor) -> bool:
    """Whether a call with first tensor ``t`` must go through the op: while compiling, or
    for a tensor subclass (FakeTensor, functional tensors) that the launch cannot take."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


@torch.library.custom_op(f"{NAMESPACE}::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, key_padding_mask: Optional[Tensor],
    ko_query_start: Optional[Tensor], ko_query_end: Optional[Tensor], ko_key_start: Optional[Tensor],
    ko_keep: Optional[Tensor], ko_mode: int, cap_row: Optional[Tensor], cap_key_start: Optional[Tensor],
    cap_length: int, need_lse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _flash.run_attention(q, k, v, causal, scale, key_padding_mask, ko_query_start, ko_query_end,
                                ko_key_start, ko_keep, ko_mode, cap_row, cap_key_start, cap_length, need_lse)


@attention.register_fake
def _attention_fake(q, k, v, causal, scale, key_padding_mask, ko_query_start, ko_query_end, ko_key_start, ko_keep,
                    ko_mode, cap_row, cap_key_start, cap_length, need_lse):
    B, Sq, Hq, D = q.shape
    has_cap = cap_row is not None
    out = q.new_empty((B, Sq, Hq, D))
    lse = q.new_empty((B, Hq, Sq) if (need_lse or has_cap) else (0,), dtype=torch.float32)
    probs = q.new_empty((B, Hq, cap_length) if has_cap else (0,), dtype=torch.float32)
    return out, lse, probs


@torch.library.custom_op(f"{NAMESPACE}::capture_from_lse", mutates_args=())
def capture_from_lse(q_row: Tensor, k: Tensor, lse_row: Tensor, key_start: Tensor, length: int, scale: float,
                     keep: Optional[Tensor]) -> Tensor:
    return _capture.run_capture_from_lse(q_row, k, lse_row, key_start, length, scale, keep)


@capture_from_lse.register_fake
def _capture_from_lse_fake(q_row, k, lse_row, key_start, length, scale, keep):
    B, Hq, _ = q_row.shape
    return q_row.new_empty((B, Hq, length), dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::grounding_metrics", mutates_args=())
def grounding_metrics(attn: Tensor, mask: Tensor, reference: Optional[Tensor], eps: float, head_mean: bool,
                      block_n: int) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_metrics.run_grounding_metrics(attn, mask, reference, eps, head_mean, block_n or None))


@grounding_metrics.register_fake
def _grounding_metrics_fake(attn, mask, reference, eps, head_mean, block_n):
    shape = attn.shape[:-2] if head_mean else attn.shape[:-1]
    return tuple(attn.new_empty(shape, dtype=torch.float32) for _ in range(3))
