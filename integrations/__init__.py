"""Model-family shims, installed as ``vgkernels.integrations``.

Each module knows one family's decoder layers and image tokens and nothing of the
kernels; :mod:`vgkernels.patching` drives them. :func:`get_shim` picks the family from
the model's class and config, or takes it from ``family=``.

==========  ==============================================================================
``llava``   ``LlavaForConditionalGeneration`` (LLaVA-1.5, LLaVA-Med-HF),
            ``LlavaNextForConditionalGeneration``  (:mod:`.llava`)
``qwen``    ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``
            (:mod:`.qwen`)
``splice``  LLaVA-codebase models splicing image features at ``-200``: HuatuoGPT-Vision,
            LLaVA-1.5 / LLaVA-Med (original code), VILA / VILA-M3 / NVILA  (:mod:`.splice`)
==========  ==============================================================================
"""
from __future__ import annotations

from .base import SUPPORTED_FAMILIES, Shim
from .llava import LlavaShim
from .qwen import QwenShim
from .splice import SpliceShim

SHIMS = {"llava": LlavaShim, "qwen": QwenShim, "splice": SpliceShim}


def get_shim(model, family=None, processor=None, **options) -> Shim:
    """The shim for ``model``: ``family`` if given, else the first whose ``matches`` holds.

    Raises ``ValueError`` naming the model's class and ``model_type`` and the supported
    families when none fits.
    """
    if family is not None:
        if family not in SHIMS:
            raise ValueError(f"family: expected one of {list(SUPPORTED_FAMILIES)}, got {family!r}")
        return SHIMS[family](model, processor, **options)
    for name in SUPPORTED_FAMILIES:
        if SHIMS[name].matches(model):
            return SHIMS[name](model, processor, **options)
    mt = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(
        f"unsupported model {type(model).__name__} (model_type={mt!r}); supported families: "
        f"llava (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration), "
        f"qwen (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration), "
        f"splice (LLaVA-codebase models with a transformers LLM: HuatuoGPT-Vision, LLaVA-1.5/LLaVA-Med, "
        f"VILA/VILA-M3/NVILA). Pass family= to force one."
    )


__all__ = ["get_shim", "Shim", "SHIMS", "SUPPORTED_FAMILIES", "LlavaShim", "QwenShim", "SpliceShim"]
