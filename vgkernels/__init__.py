"""vgkernels: fused kernels and model patches to measure and repair visual grounding.

The public API is small (SPEC §2-§6):

- :func:`attention` with :class:`Knockout` and :class:`Capture`; :func:`capture_from_lse`
- :func:`grounding_metrics` (AR, KL, JS)
- :func:`triage_mask` and :mod:`vgkernels.presets`
- :func:`box_mask`, :func:`gt_tokens_mask`, :class:`ImageLayout`
- :func:`patch_model` with :class:`KnockoutPlan`, and :class:`VGRefine`

Importing the package needs neither a GPU, flash-attn, the compiled extension nor
transformers; model-facing names load on first use.
"""
from ._types import AttentionResult, Capture, GroundingMetrics, Knockout
from .layout import ImageLayout, box_mask, grid_layout, gt_tokens_mask
from .ops import attention, capture_from_lse, grounding_metrics
from .triage import triage_mask
from . import presets

__version__ = "0.1.0"

# Names whose modules import transformers or are heavier: resolved on first access.
_LAZY = {
    "patch_model": "vgkernels.integrations.patch",
    "KnockoutPlan": "vgkernels.integrations.patch",
    "VGRefine": "vgkernels.refine",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vgkernels' has no attribute {name!r}")


__all__ = [
    "attention", "capture_from_lse", "grounding_metrics", "triage_mask",
    "Knockout", "Capture", "AttentionResult", "GroundingMetrics",
    "ImageLayout", "box_mask", "grid_layout", "gt_tokens_mask", "presets",
    "patch_model", "KnockoutPlan", "VGRefine",
]
