"""``--model``: a local Hugging Face checkpoint or a built-in tiny model.

:func:`load_model` returns a :class:`ModelBundle`: the model in eval mode, its
processor, the family (which decides how inputs are batched and how a KV-cache
continuation is called) and the chat formatting of a question.

Families:

=============  =====================================================================
``llava``      ``LlavaForConditionalGeneration`` (LLaVA-1.5-HF, LLaVA-Med-HF)
``llava-next`` ``LlavaNextForConditionalGeneration``
``qwen2-vl``   ``Qwen2VLForConditionalGeneration``
``qwen2.5-vl`` ``Qwen2_5_VLForConditionalGeneration``
``splice``     LLaVA-codebase models that splice image features at the ``-200``
               sentinel (HuatuoGPT-Vision, original LLaVA-1.5/LLaVA-Med); built-in
               ``tiny-splice``. Their checkpoints need the authors' code to load:
               build the model there and call :func:`vgkernels.sweep.runner.sweep`.
``splice-vila`` VILA / VILA-M3 / NVILA (LLM at ``.llm``); built-in ``tiny-splice-vila``.
=============  =====================================================================
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

# config.json "model_type" -> (family, transformers class name)
HF_FAMILIES = {
    "llava": ("llava", "LlavaForConditionalGeneration"),
    "llava_next": ("llava-next", "LlavaNextForConditionalGeneration"),
    "qwen2_vl": ("qwen2-vl", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration"),
}
TINY_FAMILIES = {
    "tiny-llava": "llava",
    "tiny-llava-next": "llava-next",
    "tiny-qwen2-vl": "qwen2-vl",
    "tiny-qwen2.5-vl": "qwen2.5-vl",
    "tiny-splice": "splice",
    "tiny-splice-vila": "splice-vila",
    "tiny-grounded": "llava",
}
DEFAULT_MODEL = "tiny-llava"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def chat_text(processor, text: str) -> str:
    """``text`` after one image, in the processor's chat template (a user turn and the
    assistant's generation prompt); the LLaVA-1.5 conversation format when it has none."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    tmpl = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                "chat_template", None)
    if tmpl is None:
        return f"USER: <image>\n{text} ASSISTANT:"
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


@dataclass
class ModelBundle:
    """A loaded model with what the sweep needs to drive it."""

    name: str
    family: str
    model: torch.nn.Module
    processor: object
    device: torch.device

    def chat(self, text: str) -> str:
        """The model's own prompt format around one image and ``text``."""
        return chat_text(self.processor, text)

    @property
    def is_splice(self) -> bool:
        return self.family.startswith("splice")

    def text_config(self):
        """The config object whose attention implementation the LLM's layers read."""
        cfg = getattr(self.llm(), "config", None) or self.model.config
        return getattr(cfg, "text_config", None) or cfg

    def llm(self) -> torch.nn.Module:
        """The module that continues from a KV cache with plain token ids."""
        if self.family == "splice-vila":
            return self.model.llm
        return self.model

    def n_layers_heads(self) -> tuple:
        cfg = self.text_config()
        return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)


def parse_tiny(name: str):
    """``"tiny-llava:num_layers=8,num_heads=8"`` -> ``("tiny-llava", {"num_layers": 8, ...})``;
    other names pass through with no sizes."""
    base, _, spec = name.partition(":")
    if base not in TINY_FAMILIES or not spec:
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


def _resolve_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(name: str = DEFAULT_MODEL, *, device: Optional[str] = None, dtype: Optional[str] = None,
               attn_implementation: Optional[str] = None, seed: int = 0, tiny_overrides: Optional[dict] = None
               ) -> ModelBundle:
    """Load ``name``: a built-in tiny model (:data:`TINY_FAMILIES`) or a local HF folder.

    ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on CUDA, float32
    on CPU; ``attn_implementation`` to the checkpoint's default (sdpa), which the
    patch keeps for every layer it does not capture.
    """
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = _resolve_dtype(dtype, dev)
    base, sizes = parse_tiny(name)
    if base in TINY_FAMILIES:
        tiny_overrides = {**sizes, **(tiny_overrides or {})}
        name = base
        from ..tiny import build_tiny

        kw = dict(tiny_overrides or {})
        kw.setdefault("dtype", dt)
        if attn_implementation:
            kw.setdefault("attn_implementation", attn_implementation)
        model, proc = build_tiny(name, seed=seed, **kw)
        label = name + (":" + ",".join(f"{k}={v}" for k, v in sorted(sizes.items())) if sizes else "")
        return ModelBundle(label, TINY_FAMILIES[name], model.to(dev).eval(), proc, dev)
    if not os.path.isdir(name):
        raise ValueError(f"model: {name!r} is neither a built-in tiny model ({sorted(TINY_FAMILIES)}) "
                         f"nor a local Hugging Face model directory")
    cfg_path = os.path.join(name, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"model: {name!r} has no config.json; expected a Hugging Face model directory")
    with open(cfg_path) as f:
        mtype = json.load(f).get("model_type")
    if mtype not in HF_FAMILIES:
        hint = ""
        if mtype and ("llava" in mtype or "vila" in mtype):
            hint = (" LLaVA-codebase checkpoints (HuatuoGPT-Vision, LLaVA-Med, VILA-M3) need the authors' "
                    "code to load: build the model there and call vgkernels.sweep.runner.sweep(bundle, ...)"
                    " with ModelBundle(name, 'splice', model, processor, device).")
        raise ValueError(f"model: {name!r} has model_type {mtype!r}; supported: {sorted(HF_FAMILIES)}.{hint}")
    import transformers

    family, cls_name = HF_FAMILIES[mtype]
    cls = getattr(transformers, cls_name)
    kw = {"dtype": dt} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dt}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    model = cls.from_pretrained(name, **kw).to(dev).eval()
    try:
        proc = transformers.AutoProcessor.from_pretrained(name)
    except (OSError, ValueError, AttributeError, ImportError) as e:
        raise ValueError(f"model: the processor of {name!r} failed to load ({type(e).__name__}: {e}). Qwen2-VL "
                         f"processors also build a video processor, which needs torchvision installed") from e
    return ModelBundle(os.path.abspath(name), family, model, proc, dev)
