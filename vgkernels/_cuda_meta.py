"""Fake (meta) implementations of the CUDA extension's operators (``torch.ops.vgkernels``).

``csrc/bindings.cpp`` defines the schemas (``TORCH_LIBRARY(vgkernels)``) and the CUDA
kernels; these functions give ``torch.compile`` (FakeTensor / meta tracing) the output
shapes and dtypes without running anything. :mod:`vgkernels._cuda_backend` registers them
right after loading the extension. They import nothing from the extension, so the tests
check them on machines without it, against schemas read from ``csrc/bindings.cpp``.
"""
from __future__ import annotations

import torch

OPS = ("decode_attention", "capture_rows", "metrics_rows")


def decode_attention(q, k, v, causal, scale, key_padding_mask, ko_query_start, ko_query_end, ko_key_start, ko_keep,
                     ko_mode, cap_row, cap_key_start, cap_length, num_splits):
    """``(out (B, Sq, Hq, D) q.dtype, lse (B, Hq, Sq) f32, probs (B, Hq, cap_length) f32``,
    or ``(0, 0, 0)`` without ``cap_row``)."""
    B, Sq, Hq, D = q.shape
    want = cap_row is not None
    out = q.new_empty((B, Sq, Hq, D))
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    probs = q.new_empty((B, Hq, cap_length) if want else (0, 0, 0), dtype=torch.float32)
    return out, lse, probs


def capture_rows(q_row, k, lse_row, key_start, length, scale, keep):
    """``probs (B, Hq, length)`` float32."""
    B, Hq, _ = q_row.shape
    return q_row.new_empty((B, Hq, length), dtype=torch.float32)


def metrics_rows(attn, mask, reference, eps):
    """``(ar, kl, js)``, float32, each shaped ``attn.shape[:-1]``."""
    shape = attn.shape[:-1]
    return tuple(attn.new_empty(shape, dtype=torch.float32) for _ in range(3))


_REGISTERED: set = set()


def register(namespace: str = "vgkernels") -> None:
    """Register the fakes for ``namespace::{decode_attention, capture_rows, metrics_rows}``
    (once per namespace; the schemas must already be defined)."""
    if namespace in _REGISTERED:
        return
    for name in OPS:
        torch.library.register_fake(f"{namespace}::{name}", globals()[name])
    _REGISTERED.add(namespace)
