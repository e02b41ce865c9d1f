"""Triton kernels (``backend="triton"``; ``"auto"`` on CUDA or under ``TRITON_INTERPRET=1``).

The backend functions take already-validated arguments (see :mod:`vgkernels._dispatch`)
and never synchronise with the host:

- :func:`attention` — fused flash-attention forward with causal/padding masks, knockout
  (``renorm``/``zero``), last-row capture and log-sum-exp, one launch (short-query calls,
  ``Sq <= 16``: a split-KV launch and its merge);
- :func:`capture_from_lse` — one row's probabilities rebuilt from an external lse;
- :func:`grounding_metrics` — AR/KL/JS per row in one reduction (``head_mean=True`` is an
  extra of this backend: per-layer figures from ``(..., H, N)`` maps).

Under ``torch.compile`` each is a ``torch.library`` custom op with a fake implementation
(``torch.ops.vgkernels_triton.*``, see :mod:`vgkernels.triton._ops`), so that a patched
model can be traced; eager calls launch directly. Tile
shapes come from a static table (:mod:`vgkernels.triton.tiles`), never from timing inside
a call.

Without a GPU the kernels run in Triton's interpreter; ``TRITON_INTERPRET=1`` must be set
before this package is imported (``tests/conftest.py`` does it).
"""
from ._common import INTERPRET
from .flash import attention
from .capture import capture_from_lse
from .metrics import grounding_metrics
from . import _ops, tiles  # noqa: F401  (importing _ops registers the custom ops)

__all__ = ["attention", "capture_from_lse", "grounding_metrics", "INTERPRET", "tiles"]
