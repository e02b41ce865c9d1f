"""The one family table: ``config.model_type`` -> shim, transformers class and loader.

``patch_model``, the sweep, VGRefine and the model loaders all look families up here;
what a family *does* (image tokens, chat text, where its language model sits, how its
positions continue after a KV cache) lives in its shim module.

=================  ==========  ==================================================
model_type          shim        checkpoint class / loader
=================  ==========  ==================================================
``llava``           llava       ``LlavaForConditionalGeneration`` (LLaVA-1.5-HF, LLaVA-Med-HF)
``llava_next``      llava       ``LlavaNextForConditionalGeneration``
``qwen2_vl``        qwen        ``Qwen2VLForConditionalGeneration``
``qwen2_5_vl``      qwen        ``Qwen2_5_VLForConditionalGeneration``
``llava_qwen2``     splice      LLaVA-codebase HuatuoGPT-Vision (Qwen2 LLM): ``load_llava_checkpoint``
``llava_llama``     splice      LLaVA-codebase LLaVA-1.5 / VILA (Llama LLM): ``load_llava_checkpoint``
``llava_mistral``   splice      LLaVA-codebase LLaVA-Med v1.5 (Mistral LLM): ``load_llava_checkpoint``
``vila``            splice      VILA / VILA-M3 / NVILA (LLM at ``.llm``): build it with VILA's code
=================  ==========  ==================================================

A model whose ``model_type`` is not listed is matched by its class (the transformers
classes above and their bare ``*Model`` bases), then by the LLaVA codebase's duck type
(``prepare_inputs_labels_for_multimodal``, or an ``.llm`` with an ``mm_projector``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import Shim
from .llava import LlavaShim
from .qwen import QwenShim
from .splice import SpliceShim

SHIMS = {"llava": LlavaShim, "qwen": QwenShim, "splice": SpliceShim}
SUPPORTED_FAMILIES = tuple(SHIMS)


@dataclass(frozen=True)
class Family:
    """One row of the table: ``shim`` names a key of :data:`SHIMS`; ``hf_class`` is the
    transformers class a checkpoint of this type loads with; otherwise ``loader``
    (``"module:function"``, called as ``f(path, vision_tower=, torch_dtype=,
    attn_implementation=) -> (model, processor)``) loads the LLaVA codebase's own layout.
    A row with neither cannot be loaded from a directory."""

    model_type: str
    shim: str
    hf_class: Optional[str]
    description: str
    loader: Optional[str] = None

    def load_function(self):
        """The loader named by :attr:`loader` (imported on use), or None."""
        if self.loader is None:
            return None
        import importlib

        module, _, name = self.loader.partition(":")
        return getattr(importlib.import_module(module), name)


_LLAVA_CODEBASE = "vgkernels.integrations.splice:load_llava_checkpoint"


FAMILIES = {f.model_type: f for f in (
    Family("llava", "llava", "LlavaForConditionalGeneration", "LLaVA-1.5-HF, LLaVA-Med-HF"),
    Family("llava_next", "llava", "LlavaNextForConditionalGeneration", "LLaVA-NeXT"),
    Family("qwen2_vl", "qwen", "Qwen2VLForConditionalGeneration", "Qwen2-VL"),
    Family("qwen2_5_vl", "qwen", "Qwen2_5_VLForConditionalGeneration", "Qwen2.5-VL"),
    Family("llava_qwen2", "splice", None, "LLaVA codebase, Qwen2 LLM (HuatuoGPT-Vision)", _LLAVA_CODEBASE),
    Family("llava_llama", "splice", None, "LLaVA codebase, Llama LLM (LLaVA-1.5, VILA)", _LLAVA_CODEBASE),
    Family("llava_mistral", "splice", None, "LLaVA codebase, Mistral LLM (LLaVA-Med v1.5)", _LLAVA_CODEBASE),
    Family("vila", "splice", None, "VILA / VILA-M3 / NVILA"),
)}


def model_type(model) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def detect(model) -> str:
    """The shim family of ``model`` (a key of :data:`SHIMS`), or ``ValueError``."""
    mt = model_type(model)
    if mt in FAMILIES:
        return FAMILIES[mt].shim
    names = {c.__name__ for c in type(model).__mro__}
    for name in ("llava", "qwen"):
        if names & set(SHIMS[name].CLASSES):
            return name
    if SpliceShim.matches(model):
        return "splice"
    raise ValueError(
        f"unsupported model {type(model).__name__} (model_type={mt!r}); supported families: "
        f"llava (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration), "
        f"qwen (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration), "
        f"splice (LLaVA-codebase models with a transformers LLM: HuatuoGPT-Vision, LLaVA-1.5/LLaVA-Med, "
        f"VILA/VILA-M3/NVILA; model_type {sorted(k for k, f in FAMILIES.items() if f.shim == 'splice')}). "
        f"Pass family= to force one."
    )


def get_shim(model, family: Optional[str] = None, processor=None, **options) -> Shim:
    """The shim for ``model``: ``family`` if given, else :func:`detect`."""
    if family is not None and family not in SHIMS:
        raise ValueError(f"family: expected one of {list(SUPPORTED_FAMILIES)}, got {family!r}")
    return SHIMS[family or detect(model)](model, processor, **options)


__all__ = ["FAMILIES", "Family", "SHIMS", "SUPPORTED_FAMILIES", "detect", "get_shim", "model_type"]
