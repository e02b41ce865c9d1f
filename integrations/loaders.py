"""``--model``: a local checkpoint or a built-in tiny model, as a :class:`ModelBundle`.

:func:`load_model` returns the model in eval mode, its processor and the family shim
(:mod:`.families`), which the sweep and VGRefine ask for everything family-specific
(how to call the processor, the chat text, where the LLM is, how positions continue
after a KV cache). A local directory is recognised by its ``config.json``'s
``model_type`` through the one family table (a transformers class, or the row's loader:
LLaVA-codebase checkpoints such as HuatuoGPT-Vision, with ``vision_tower=`` their CLIP
tower's folder when the config does not name a local one); built-in tiny models are those of
:data:`vgkernels.tiny.TINY_MODELS`, optionally sized: ``tiny-llava:num_layers=8``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .families import FAMILIES, get_shim

DEFAULT_MODEL = "tiny-llava"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelBundle:
    """A loaded model with what the pipelines need to drive it."""

    name: str
    model: torch.nn.Module
    processor: object
    device: torch.device
    shim: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.shim is None:
            self.shim = get_shim(self.model, processor=self.processor)

    @property
    def family(self) -> str:
        """The shim family: ``llava``, ``qwen`` or ``splice``."""
        return self.shim.family

    @property
    def model_type(self) -> Optional[str]:
        return getattr(getattr(self.model, "config", None), "model_type", None)

    def chat(self, text: str) -> str:
        """The model's own prompt format around one image and ``text``."""
        return self.shim.chat_text(self.processor, text)

    def text_config(self):
        """The config of the LLM's layers (heads, layers)."""
        cfg = getattr(self.shim.llm(), "config", None) or self.model.config
        return getattr(cfg, "text_config", None) or cfg

    def n_layers_heads(self) -> tuple:
        cfg = self.text_config()
        return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)


def parse_tiny(name: str):
    """``"tiny-llava:num_layers=8,num_heads=8"`` -> ``("tiny-llava", {"num_layers": 8, ...})``;
    other names pass through with no sizes."""
    from vgkernels.tiny import TINY_MODELS

    base, _, spec = name.partition(":")
    if base not in TINY_MODELS or not spec:
        return name, {}
    sizes = {}
    for part in spec.split(","):
        k, eq, v = part.partition("=")
        if not eq:
            raise ValueError(f"model: expected KEY=VALUE after ':' in {name!r}, got {part!r}")
        try:
            sizes[k.strip()] = int(v)
        except ValueError:
            sizes[k.strip()] = v.strip()
    return base, sizes


def resolve_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(name: str = DEFAULT_MODEL, *, device: Optional[str] = None, dtype: Optional[str] = None,
               attn_implementation: Optional[str] = None, seed: int = 0, tiny_overrides: Optional[dict] = None,
               vision_tower: Optional[str] = None) -> ModelBundle:
    """Load ``name``: a built-in tiny model or a local checkpoint directory.

    ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on CUDA, float32
    on CPU; ``attn_implementation`` to the checkpoint's default (sdpa), which patched
    layers keep for their ordinary rows; ``vision_tower`` is the local CLIP tower folder
    of a LLaVA-codebase checkpoint (default: its config's ``mm_vision_tower``).
    """
    from vgkernels.tiny import TINY_MODELS

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = resolve_dtype(dtype, dev)
    base, sizes = parse_tiny(name)
    if base in TINY_MODELS:
        from vgkernels.tiny import build_tiny

        kw = {**sizes, **(tiny_overrides or {})}
        kw.setdefault("dtype", dt)
        if attn_implementation:
            kw.setdefault("attn_implementation", attn_implementation)
        model, proc = build_tiny(base, seed=seed, **kw)
        label = base + (":" + ",".join(f"{k}={v}" for k, v in sorted(sizes.items())) if sizes else "")
        return ModelBundle(label, model.to(dev).eval(), proc, dev)
    if not os.path.isdir(name):
        raise ValueError(f"model: {name!r} is neither a built-in tiny model ({sorted(TINY_MODELS)}) "
                         f"nor a local model directory")
    cfg_path = os.path.join(name, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"model: {name!r} has no config.json; expected a Hugging Face model directory")
    with open(cfg_path) as f:
        mtype = json.load(f).get("model_type")
    fam = FAMILIES.get(mtype)
    if fam is None:
        raise ValueError(f"model: {name!r} has model_type {mtype!r}; supported: {sorted(FAMILIES)}")
    if vision_tower is not None and fam.hf_class is not None:
        raise ValueError(f"vision_tower: only LLaVA-codebase checkpoints take a separate vision tower; {name!r} has "
                         f"model_type {mtype!r} ({fam.hf_class})")
    if fam.hf_class is None:
        load = fam.load_function()
        if load is None:
            raise ValueError(f"model: {name!r} has model_type {mtype!r} ({fam.description}), which cannot be loaded "
                             "from a directory without its own code; build the model there and pass it to the Python "
                             "API (vgkernels.sweep.command.sweep with a ModelBundle)")
        try:
            model, proc = load(name, vision_tower=vision_tower, torch_dtype=dt, attn_implementation=attn_implementation)
        except ValueError as e:
            raise ValueError(f"model: {name!r} is a LLaVA-codebase checkpoint (model_type {mtype!r}) that cannot be "
                             f"loaded: {e}") from e
        return ModelBundle(os.path.abspath(name), model.to(dev).eval(), proc, dev)
    import transformers

    cls = getattr(transformers, fam.hf_class)
    kw = {"dtype": dt} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dt}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    model = cls.from_pretrained(name, **kw).to(dev).eval()
    try:
        proc = transformers.AutoProcessor.from_pretrained(name)
    except (OSError, ValueError, AttributeError, ImportError) as e:
        raise ValueError(f"model: the processor of {name!r} failed to load ({type(e).__name__}: {e}). Qwen2-VL "
                         f"processors also build a video processor, which needs torchvision installed") from e
    return ModelBundle(os.path.abspath(name), model, proc, dev)


__all__ = ["ModelBundle", "load_model", "parse_tiny", "resolve_dtype", "DEFAULT_MODEL"]
