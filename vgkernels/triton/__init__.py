"""Triton kernels (``backend="triton"``; ``"auto"`` on CUDA or under ``TRITON_INTERPRET=1``).

The backend functions take already-validated arguments (see :mod:`vgkernels._dispatch`):

- :func:`attention` — fused flash-attention forward with causal/padding masks, knockout
  (``renorm``/``zero``), last-row capture and log-sum-exp, one launch;
- :func:`capture_from_lse` — one row's probabilities rebuilt from an external lse;
- :func:`grounding_metrics` — AR/KL/JS per row in one reduction (``head_mean=True`` is an
  extra of this backend: per-layer figures from ``(..., H, N)`` maps).

Without a GPU the kernels run in Triton's interpreter; ``TRITON_INTERPRET=1`` must be set
before this package is imported (``tests/conftest.py`` does it).
"""
from ._common import INTERPRET
from .flash import attention
from .capture import capture_from_lse
from .metrics import grounding_metrics

__all__ = ["attention", "capture_from_lse", "grounding_metrics", "INTERPRET"]
