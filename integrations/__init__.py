"""Everything in vgkernels that touches transformers, installed as ``vgkernels.integrations``.

- :mod:`.takeover` — the one attention takeover (registration, per-layer switch, plans,
  composed and fused execution);
- :mod:`.patch` — :func:`patch_model` and its handle;
- :mod:`.continuation` — prefix once, suffix passes and greedy decoding over a KV cache;
- :mod:`.families` — the ``model_type`` table and :func:`get_shim`;
- :mod:`.llava`, :mod:`.qwen`, :mod:`.splice` — the family shims (they know the models,
  not the kernels);
- :mod:`.llava_codebase` — LLaVA-codebase checkpoints (HuatuoGPT-Vision, LLaVA-1.5,
  LLaVA-Med v1.5) on plain transformers (``splice.load_llava_checkpoint``).

Importing this package does not import transformers; its modules do so on first use.
"""
from __future__ import annotations

from .base import Shim
from .families import FAMILIES, SHIMS, SUPPORTED_FAMILIES, detect, get_shim
from .llava import LlavaShim
from .qwen import QwenShim
from .splice import SpliceShim

__all__ = ["get_shim", "detect", "Shim", "SHIMS", "FAMILIES", "SUPPORTED_FAMILIES", "LlavaShim", "QwenShim",
           "SpliceShim"]
