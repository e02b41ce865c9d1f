"""LLaVA-codebase checkpoints on plain transformers: model classes, preprocessing, loading.

HuatuoGPT-Vision (``model_type: llava_qwen2``), the original LLaVA-1.5 (``llava_llama``) and
LLaVA-Med v1.5 (``llava_mistral``) are published in the layout of the LLaVA code base:
a ``config.json`` holding the LLM's fields plus ``mm_*`` fields, weights named as the
LLM's own (``model.embed_tokens``, ``model.layers``, ``lm_head``) plus
``model.mm_projector.*`` (and sometimes ``model.vision_tower.vision_tower.*``), and a CLIP
tower named by ``mm_vision_tower``. This module rebuilds what that code base does at
inference, without importing it and without ``trust_remote_code``:

- :class:`LlavaQwen2ForCausalLM`, :class:`LlavaLlamaForCausalLM`,
  :class:`LlavaMistralForCausalLM`: the transformers CausalLM classes plus the image
  path of :class:`LlavaCodebaseMixin` (``model.mm_projector``, ``model.vision_tower``,
  the ``-200`` splice in ``forward`` and ``generate``);
- :class:`CLIPTower`: ``CLIPVisionModel`` features at ``mm_vision_select_layer``, the CLS
  token dropped (``"patch"``) or kept (``"cls_patch"``);
- :class:`LlavaCodebaseProcessor`: ``expand2square`` with the image processor's mean
  colour then CLIP preprocessing; ``tokenizer_image_token`` (``<image>`` becomes
  ``IMAGE_TOKEN_INDEX``, one BOS); each model's chat format as a chat template
  (:data:`CHAT_TEMPLATES`);
- :func:`load_checkpoint` (public as
  :func:`vgkernels.integrations.splice.load_llava_checkpoint`).

The built-in ``tiny-splice`` model (:mod:`vgkernels.integrations.tiny`) is an instance of
:class:`LlavaQwen2ForCausalLM` with random weights, so every test of the splice family
runs these classes.

Chat formats (one user turn with one image, then the assistant's turn):

=====================  ==================================================================
``huatuo``             ``<|user|>\\n<image>\\n{text}\\n<|assistant|>\\n`` (HuatuoGPT-Vision's ``cli.py``)
``vicuna_v1``          ``{system} USER: <image>\\n{text} ASSISTANT:`` (LLaVA-1.5's default)
``mistral_instruct``   ``[INST] <image>\\n{text} [/INST]`` (LLaVA-Med v1.5's evaluation mode)
=====================  ==================================================================
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

import torch
import transformers
from torch import nn
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from vgkernels.constants import IMAGE_TOKEN_INDEX

from .continuation import cache_keyword

IMAGE_PLACEHOLDER = "<image>"
_TF_MAJOR = int(transformers.__version__.split(".")[0])

# ----------------------------------------------------------------------------- chat formats

#: The system line of LLaVA-1.5's ``vicuna_v1`` conversation (the model was trained with it).
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# A message's text: one "<image>\n" per image item, then its text items (HF message format).
_BODY = (
    "{%- if m['content'] is string -%}{%- set body = m['content'] -%}"
    "{%- else -%}{%- set ns = namespace(t='') -%}{%- for it in m['content'] -%}"
    "{%- if it['type'] == 'image' -%}{%- set ns.t = ns.t + '<image>\\n' -%}"
    "{%- elif it['type'] == 'text' -%}{%- set ns.t = ns.t + it['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set body = ns.t -%}{%- endif -%}"
)

CHAT_TEMPLATES = {
    # HuatuoGPT-Vision: the user's text is stripped; past answers end with " \n".
    "huatuo": (
        "{%- for m in messages -%}" + _BODY +
        "{%- if m['role'] == 'user' -%}{{ '<|user|>\\n' + (body | trim) + '\\n' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ '<|assistant|>\\n' + body + ' \\n' }}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
    ),
    # LLaVA-1.5 vicuna_v1: system, then "USER: ... " and "ASSISTANT: ...</s>" turns.
    "vicuna_v1": (
        "{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + " ' }}"
        "{%- for m in messages -%}" + _BODY +
        "{%- if m['role'] == 'user' -%}{{ 'USER: ' + body + ' ' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + body + '</s>' }}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    ),
    # LLaVA-Med v1.5 mistral_instruct (Llama-2 style, empty system): "[INST] ... [/INST]".
    "mistral_instruct": (
        "{%- for m in messages -%}" + _BODY +
        "{%- if m['role'] == 'user' -%}{{ '[INST] ' + body + ' [/INST]' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ ' ' + body + ' </s>' }}{%- endif -%}"
        "{%- endfor -%}"
    ),
}
DEFAULT_CHAT = {"llava_qwen2": "huatuo", "llava_llama": "vicuna_v1", "llava_mistral": "mistral_instruct"}

# ----------------------------------------------------------------------------- configs & models


class LlavaQwen2Config(Qwen2Config):
    model_type = "llava_qwen2"


class LlavaLlamaConfig(LlamaConfig):
    model_type = "llava_llama"


class LlavaMistralConfig(MistralConfig):
    model_type = "llava_mistral"


def projector_depth(kind: Optional[str]) -> int:
    """Linear layers of an ``mm_projector_type``: ``linear`` is 1, ``mlp{n}x_gelu`` is n;
    anything else raises ``ValueError``."""
    kind = kind or "linear"
    if kind == "linear":
        return 1
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"mm_projector_type: expected 'linear' or 'mlp<N>x_gelu' (e.g. mlp2x_gelu), got {kind!r}")
    return int(m.group(1))


def build_projector(config) -> nn.Module:
    """``mm_projector_type`` ``linear`` or ``mlp{n}x_gelu`` from ``mm_hidden_size`` to
    ``hidden_size``, with the code base's module indices (``mlp2x_gelu``: weights at ``0``
    and ``2``; ``linear``: a bare ``nn.Linear``)."""
    kind = getattr(config, "mm_projector_type", "linear")
    depth = projector_depth(kind)
    cin, cout = int(config.mm_hidden_size), int(config.hidden_size)
    if (kind or "linear") == "linear":
        return nn.Linear(cin, cout)
    mods = [nn.Linear(cin, cout)]
    for _ in range(depth - 1):
        mods += [nn.GELU(), nn.Linear(cout, cout)]
    return nn.Sequential(*mods)


class CLIPTower(nn.Module):
    """The code base's ``CLIPVisionTower`` at inference: images ``(n, 3, H, W)`` ->
    features ``(n, N, C)`` of hidden layer ``select_layer`` (``hidden_states`` index, so
    ``-2`` is the penultimate layer), without the CLS token (``"patch"``: ``N = (H/p)²``)
    or with it first (``"cls_patch"``: ``N = (H/p)² + 1``). The CLIP model sits at
    ``.vision_tower``, as in the code base (whose checkpoints name its weights
    ``model.vision_tower.vision_tower.*``)."""

    def __init__(self, clip: nn.Module, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature: expected 'patch' or 'cls_patch', got {select_feature!r}")
        self.vision_tower = clip
        self.select_layer = int(select_layer)
        self.select_feature = select_feature

    @property
    def config(self):
        return self.vision_tower.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_patches_per_side(self) -> int:
        return int(self.config.image_size) // int(self.config.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.vision_tower.parameters())
        out = self.vision_tower(images.to(device=p.device, dtype=p.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        return feats[:, 1:] if self.select_feature == "patch" else feats


def splice_embeddings(embed: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      features: Sequence[torch.Tensor], *, padding_side: str = "right",
                      max_length: Optional[int] = None):
    """The code base's splice (``prepare_inputs_labels_for_multimodal``) for inference.

    For each sample, the real ids (``attention_mask`` 1) in order, with the ``i``-th
    ``IMAGE_TOKEN_INDEX`` of the batch replaced by the rows of ``features[i]`` and the
    other ids by their embeddings; each sequence cut to ``max_length``
    (``tokenizer_model_max_length``) when given; samples zero-padded to the longest on
    ``padding_side``. Returns ``(inputs_embeds (B, T, d), attention_mask (B, T))``, the
    mask in the dtype of the given one (long when none was given).
    """
    B = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    n_sent = int((input_ids[attention_mask.bool()] == IMAGE_TOKEN_INDEX).sum())
    if n_sent != len(features):
        raise ValueError(f"images: input_ids hold {n_sent} image sentinel(s) ({IMAGE_TOKEN_INDEX}) but "
                         f"{len(features)} image(s) were given")
    rows, img = [], 0
    for b in range(B):
        ids = input_ids[b][attention_mask[b].bool()]
        cut = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
        bounds = [-1] + cut + [ids.numel()]
        pieces = []
        for j in range(len(bounds) - 1):
            pieces.append(embed(ids[bounds[j] + 1: bounds[j + 1]]))
            if j < len(cut):
                pieces.append(features[img].to(pieces[-1].dtype))
                img += 1
        row = torch.cat(pieces, dim=0)
        rows.append(row[:max_length] if max_length is not None else row)
    T = max(r.shape[0] for r in rows)
    emb = rows[0].new_zeros(B, T, rows[0].shape[1])
    mask = torch.zeros(B, T, dtype=attention_mask.dtype, device=attention_mask.device)
    for b, r in enumerate(rows):
        n = r.shape[0]
        sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
        emb[b, sl], mask[b, sl] = r, 1
    return emb, mask


class LlavaCodebaseMixin:
    """The image path of the code base's ``Llava*ForCausalLM`` on top of a transformers
    CausalLM (it comes first in the bases, so its ``forward``/``generate`` wrap the LM's).

    - ``self.model.mm_projector``, built from the config (the code base's name, so
      ``from_pretrained`` loads it); ``self.vision_tower``, a :class:`CLIPTower` attached
      by :meth:`attach_vision_tower`. The code base keeps the tower inside ``self.model``;
      here it sits beside it, because transformers 5 installs its output-recording hooks
      on every submodel of the decoder the first time ``output_attentions`` or
      ``output_hidden_states`` is asked for, and a tower that already ran (it always asks
      for hidden states) would then be hooked twice and return the wrong layer. Saved
      tower weights (``model.vision_tower.vision_tower.*``) are loaded by
      :func:`load_checkpoint`;
    - ``encode_images(images (n, 3, H, W)) -> (n, N, hidden)``;
    - ``forward(input_ids, attention_mask, images=..., ...)``: with images, the ids'
      ``-200`` sentinels are replaced by image features (:func:`splice_embeddings`,
      padding on ``config.tokenizer_padding_side``) and the LM runs on ``inputs_embeds``;
      without images (text, or decode steps on a cache) the LM runs on the ids;
    - ``generate(inputs | input_ids, images=..., attention_mask=..., **kw)``: splices once
      and calls the LM's ``generate(inputs_embeds=...)``, so the returned ids are the
      new tokens only, as with the code base.
    """

    # Saved tower weights are loaded after the tower is attached, not by from_pretrained.
    _keys_to_ignore_on_load_unexpected = [r"^model\.vision_tower\."]

    def __init__(self, config):
        super().__init__(config)
        self.model.mm_projector = build_projector(config)

    def get_model(self):
        return self.model

    def get_vision_tower(self) -> Optional[CLIPTower]:
        return getattr(self, "vision_tower", None)

    def attach_vision_tower(self, tower: CLIPTower) -> None:
        self.vision_tower = tower

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        tower = self.get_vision_tower()
        if tower is None:
            raise ValueError(f"{type(self).__name__} has no vision tower; load it with load_llava_checkpoint or call "
                             "attach_vision_tower")
        proj = self.model.mm_projector
        w = next(proj.parameters())
        return proj(tower(images).to(dtype=w.dtype, device=w.device))

    def prepare_inputs_labels_for_multimodal(self, input_ids, position_ids, attention_mask, past_key_values, labels,
                                             images, image_sizes=None):
        """The code base's entry point (same arguments and return tuple), inference only."""
        if images is None or input_ids is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        if labels is not None or position_ids is not None:
            raise ValueError("labels / position_ids with images: the splice changes the sequence length and this "
                             "rebuild is for inference only; pass neither")
        images = torch.cat([im[None] if im.dim() == 3 else im for im in images]) if isinstance(images, list) \
            else images
        feats = list(self.encode_images(images))
        emb, mask = splice_embeddings(self.get_input_embeddings(), input_ids, attention_mask, feats,
                                      padding_side=getattr(self.config, "tokenizer_padding_side", "right"),
                                      max_length=getattr(self.config, "tokenizer_model_max_length", None))
        return None, None, mask, past_key_values, emb, None

    def _lm_kwargs(self, kwargs: dict) -> dict:
        """Route the KV cache to the keyword this transformers version's LM takes."""
        want = cache_keyword(super().forward)
        other = "past_key_values" if want == "cache" else "cache"
        if other in kwargs:
            kwargs[want] = kwargs.pop(other)
        return kwargs

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                images=None, image_sizes=None, **kwargs):
        if inputs_embeds is None and images is not None:
            input_ids, position_ids, attention_mask, _, inputs_embeds, labels = \
                self.prepare_inputs_labels_for_multimodal(input_ids, position_ids, attention_mask, None, labels,
                                                          images, image_sizes)
        elif input_ids is not None and input_ids.shape[-1] > 1 and bool((input_ids == IMAGE_TOKEN_INDEX).any()):
            raise ValueError(f"input_ids hold the image sentinel {IMAGE_TOKEN_INDEX} but no images were given")
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels, **self._lm_kwargs(kwargs))

    @torch.no_grad()
    def generate(self, inputs=None, images=None, image_sizes=None, **kwargs):
        ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if ids is None or "inputs_embeds" in kwargs:
            raise ValueError("generate: pass the prompt ids (inputs or input_ids, with the -200 image sentinel), "
                             "not inputs_embeds")
        mask = kwargs.pop("attention_mask", None)
        if images is not None:
            _, _, mask, _, emb, _ = self.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, images,
                                                                              image_sizes)
        else:
            if bool((ids == IMAGE_TOKEN_INDEX).any()):
                raise ValueError(f"input_ids hold the image sentinel {IMAGE_TOKEN_INDEX} but no images were given")
            emb = self.get_input_embeddings()(ids)
        return super().generate(inputs_embeds=emb, attention_mask=mask, **kwargs)


class LlavaQwen2ForCausalLM(LlavaCodebaseMixin, Qwen2ForCausalLM):
    """HuatuoGPT-Vision (Qwen2 LLM); see :class:`LlavaCodebaseMixin`."""

    config_class = LlavaQwen2Config


class LlavaLlamaForCausalLM(LlavaCodebaseMixin, LlamaForCausalLM):
    """The original LLaVA-1.5 (Llama / Vicuna LLM); see :class:`LlavaCodebaseMixin`."""

    config_class = LlavaLlamaConfig


class LlavaMistralForCausalLM(LlavaCodebaseMixin, MistralForCausalLM):
    """LLaVA-Med v1.5 (Mistral LLM); see :class:`LlavaCodebaseMixin`."""

    config_class = LlavaMistralConfig


#: ``model_type`` -> (config class, model class)
CLASSES = {
    "llava_qwen2": (LlavaQwen2Config, LlavaQwen2ForCausalLM),
    "llava_llama": (LlavaLlamaConfig, LlavaLlamaForCausalLM),
    "llava_mistral": (LlavaMistralConfig, LlavaMistralForCausalLM),
}

# ----------------------------------------------------------------------------- preprocessing


def expand2square(image, background):
    """Pad the shorter side of a PIL image, centred (offset ``(max - side) // 2``), with
    ``background`` (an RGB tuple of 0-255 ints)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def clip_image_processor_class():
    """The PIL-based CLIP image processor of this transformers version (what the code
    base used; 5.x's default class needs torchvision)."""
    return transformers.CLIPImageProcessorPil if _TF_MAJOR >= 5 else transformers.CLIPImageProcessor


class SpliceBatch(dict):
    """What the preprocessing hands the model: a dict (``model(**batch)``,
    ``model.generate(**batch)``) whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class LlavaCodebaseProcessor:
    """The code base's preprocessing behind an HF-processor-like call.

    ``processor(images=[...], text=[...], padding_side="left")`` returns a
    :class:`SpliceBatch` with ``input_ids (B, S)`` holding ``IMAGE_TOKEN_INDEX`` where
    ``<image>`` stood, ``attention_mask``, ``images (n, 3, side, side)`` and
    ``image_sizes`` (``(width, height)`` per image).

    Images: ``image_aspect_ratio == "pad"``: ``expand2square`` with the image processor's
    mean colour (as 0-255 ints), then the CLIP image processor (resize, centre crop —
    a no-op on the square — rescale, normalise); ``"resize"``: squashed to the square
    first; anything else: the CLIP image processor alone (shortest side, centre crop).
    Text: :meth:`tokenizer_image_token`. ``apply_chat_template`` renders
    ``chat_template`` (a Jinja template over HF-style messages).
    """

    def __init__(self, tokenizer, image_processor, *, image_aspect_ratio: Optional[str] = "pad",
                 chat_template: Optional[str] = None):
        if isinstance(image_aspect_ratio, str) and image_aspect_ratio.startswith("anyres"):
            raise ValueError(f"image_aspect_ratio: {image_aspect_ratio!r} (LLaVA-NeXT tiling) is not supported for "
                             "LLaVA-codebase checkpoints; supported: 'pad', 'resize', or CLIP's crop")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_aspect_ratio = image_aspect_ratio
        self.chat_template = chat_template if chat_template is not None else CHAT_TEMPLATES["vicuna_v1"]

    @property
    def image_size(self) -> int:
        """Side of the square image the vision tower receives."""
        crop = getattr(self.image_processor, "crop_size", None)
        if isinstance(crop, dict):
            return int(crop["height"])
        if crop is not None and hasattr(crop, "height"):
            return int(crop.height)
        size = self.image_processor.size
        return int(size["shortest_edge"] if isinstance(size, dict) else size.shortest_edge)

    @property
    def image_mean(self):
        return tuple(self.image_processor.image_mean)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kw):
        if tokenize:
            raise ValueError("apply_chat_template: tokenize=True is not supported; call the processor on the text")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, chat_template=self.chat_template)

    def process_images(self, images) -> torch.Tensor:
        from PIL import Image

        out = []
        for im in images:
            im = im.convert("RGB")
            if self.image_aspect_ratio == "pad":
                im = expand2square(im, tuple(int(c * 255) for c in self.image_mean))
            elif self.image_aspect_ratio == "resize":
                im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
            out.append(torch.as_tensor(self.image_processor(im, return_tensors="pt")["pixel_values"][0]))
        return torch.stack(out)

    def tokenizer_image_token(self, prompt: str) -> list:
        """Ids of ``prompt`` with ``IMAGE_TOKEN_INDEX`` per ``<image>``: each piece between
        placeholders is tokenised on its own (with the tokenizer's special tokens), and a
        BOS the tokenizer puts at the start of every piece is kept once, at the front."""
        bos = self.tokenizer.bos_token_id
        pieces = [list(self.tokenizer(p).input_ids) for p in prompt.split(IMAGE_PLACEHOLDER)]
        lead = bos is not None and bool(pieces[0]) and pieces[0][0] == bos
        ids = [bos] if lead else []
        for i, p in enumerate(pieces):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(p[1:] if lead and p and p[0] == bos else p)
        return ids

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for v in (tok.pad_token_id, tok.eos_token_id):
            if v is not None:
                return int(v)
        return 0

    def __call__(self, images=None, text=None, padding_side: str = "left", return_tensors="pt", **kw):
        if text is None:
            raise ValueError("text: expected a prompt or a list of prompts, got None")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.tokenizer_image_token(t) for t in texts]
        S = max(len(r) for r in rows)
        ids = torch.full((len(rows), S), self._pad_id(), dtype=torch.long)
        att = torch.zeros(len(rows), S, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(S - len(r), S) if padding_side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            att[i, sl] = 1
        batch = SpliceBatch(input_ids=ids, attention_mask=att)
        if images is not None:
            ims = list(images) if isinstance(images, (list, tuple)) else [images]
            batch["images"] = self.process_images(ims)
            batch["image_sizes"] = [tuple(im.size) for im in ims]
        return batch

    def batch_decode(self, *a, **kw):
        return self.tokenizer.batch_decode(*a, **kw)

    def decode(self, *a, **kw):
        return self.tokenizer.decode(*a, **kw)


# ----------------------------------------------------------------------------- loading

_SAVED_TOWER = "model.vision_tower."  # prefix of tower weights a checkpoint may hold
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path!r}: no config.json; expected a LLaVA-codebase checkpoint directory")
    with open(cfg_path) as f:
        return json.load(f)


def resolve_vision_tower(path: str, cfg: dict, vision_tower: Optional[str]) -> str:
    """The local directory of the CLIP tower: ``vision_tower`` when given, else the
    config's ``mm_vision_tower`` (or ``vision_tower``) as a path, absolute or relative to
    the checkpoint (as the code base resolves it). Hub ids cannot be downloaded here."""
    if vision_tower is not None:
        if not os.path.isdir(vision_tower):
            raise ValueError(f"vision_tower: {vision_tower!r} is not a directory; pass the local folder of the CLIP "
                             "vision tower (config.json, preprocessor_config.json, weights)")
        return vision_tower
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not name:
        raise ValueError(f"{path!r}: config.json names no mm_vision_tower; pass vision_tower=DIR (--vision-tower DIR)")
    for cand in (name, os.path.join(path, name)):
        if os.path.isdir(cand):
            return cand
    raise ValueError(f"{path!r}: the vision tower {name!r} (config mm_vision_tower) is not a local directory; "
                     f"vgkernels does not download models: get it (e.g. `huggingface-cli download {name}` on a "
                     "machine with access) and pass vision_tower=DIR (--vision-tower DIR)")


def check_config(cfg: dict, path: str) -> None:
    """Refuse what this rebuild does not implement, naming the field."""
    mt = cfg.get("model_type")
    if mt not in CLASSES:
        raise ValueError(f"{path!r}: model_type {mt!r} is not a LLaVA-codebase type this loader knows; "
                         f"supported: {sorted(CLASSES)}")
    projector_depth(cfg.get("mm_projector_type", "linear"))
    ar = cfg.get("image_aspect_ratio")
    if isinstance(ar, str) and ar.startswith("anyres"):
        raise ValueError(f"{path!r}: image_aspect_ratio {ar!r} (LLaVA-NeXT tiling) is not supported")
    if cfg.get("mm_use_im_start_end"):
        raise ValueError(f"{path!r}: mm_use_im_start_end=true (image start/end tokens) is not supported")
    merge = cfg.get("mm_patch_merge_type", "flat")
    if merge not in (None, "flat"):
        raise ValueError(f"{path!r}: mm_patch_merge_type {merge!r} is not supported (only 'flat')")
    feat = cfg.get("mm_vision_select_feature", "patch")
    if feat not in ("patch", "cls_patch"):
        raise ValueError(f"{path!r}: mm_vision_select_feature {feat!r}: expected 'patch' or 'cls_patch'")


def checkpoint_tensors(path: str, prefix: str) -> dict:
    """Every tensor of the checkpoint in ``path`` whose name starts with ``prefix``, read
    from safetensors (single or sharded) or, failing that, ``pytorch_model*.bin`` with
    ``torch.load(weights_only=True)``."""
    from safetensors import safe_open

    def files(index: str, single: str) -> list:
        ip = os.path.join(path, index)
        if os.path.isfile(ip):
            with open(ip) as f:
                return sorted(set(json.load(f)["weight_map"].values()))
        return [single] if os.path.isfile(os.path.join(path, single)) else []

    out = {}
    st = files("model.safetensors.index.json", "model.safetensors")
    if st:
        for name in st:
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for k in f.keys():
                    if k.startswith(prefix):
                        out[k] = f.get_tensor(k)
        return out
    bins = files("pytorch_model.bin.index.json", "pytorch_model.bin")
    if not bins:
        raise ValueError(f"{path!r}: no weights found (expected one of {list(_WEIGHT_FILES)})")
    for name in bins:
        sd = torch.load(os.path.join(path, name), map_location="cpu", weights_only=True, mmap=True)
        out.update({k: v for k, v in sd.items() if k.startswith(prefix)})
    return out


def _is_single_device(device_map) -> bool:
    return device_map is None or isinstance(device_map, (int, torch.device)) or \
        (isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"))


def load_checkpoint(path: str, *, vision_tower: Optional[str] = None, torch_dtype=None, device_map=None,
                    attn_implementation: Optional[str] = None, chat: Optional[str] = None):
    """Load a LLaVA-codebase checkpoint directory; returns ``(model, processor)`` in eval mode.

    See :func:`vgkernels.integrations.splice.load_llava_checkpoint` for the parameters;
    ``chat`` picks a key of :data:`CHAT_TEMPLATES` (default: by ``model_type``).
    """
    cfg = read_config(path)
    check_config(cfg, path)
    mt = cfg["model_type"]
    tower_dir = resolve_vision_tower(path, cfg, vision_tower)
    if chat is not None and chat not in CHAT_TEMPLATES:
        raise ValueError(f"chat: expected one of {sorted(CHAT_TEMPLATES)}, got {chat!r}")
    if not os.path.isfile(os.path.join(tower_dir, "preprocessor_config.json")):
        raise ValueError(f"vision tower {tower_dir!r}: no preprocessor_config.json (the CLIP image processor's "
                         "settings); use the tower's original folder")
    cfg_cls, model_cls = CLASSES[mt]
    config = cfg_cls.from_pretrained(path)
    clip_cfg = transformers.CLIPVisionConfig.from_pretrained(tower_dir)
    if getattr(config, "mm_hidden_size", None) is None:
        config.mm_hidden_size = clip_cfg.hidden_size
    kw = {}
    if torch_dtype is not None:
        kw["dtype"] = torch_dtype
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    if not _is_single_device(device_map):
        kw["device_map"] = device_map
    model = model_cls.from_pretrained(path, config=config, **kw)
    clip = transformers.CLIPVisionModel.from_pretrained(tower_dir, dtype=model.dtype)
    tower = CLIPTower(clip, cfg.get("mm_vision_select_layer", -2), cfg.get("mm_vision_select_feature", "patch"))
    saved = checkpoint_tensors(path, _SAVED_TOWER)
    if saved:
        own = tower.state_dict()
        state = {k[len(_SAVED_TOWER):]: v for k, v in saved.items()}
        unknown = [k for k in state if k not in own and not k.endswith("position_ids")]
        if unknown:
            raise ValueError(f"{path!r}: saved vision-tower weights do not fit the CLIP tower of {tower_dir!r}: "
                             f"{unknown[:5]}")
        tower.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    tower.to(device=model.get_input_embeddings().weight.device, dtype=model.dtype)
    model.attach_vision_tower(tower)
    if _is_single_device(device_map) and device_map is not None:
        model.to(torch.device(device_map) if not isinstance(device_map, int) else torch.device("cuda", device_map))
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    image_processor = clip_image_processor_class().from_pretrained(tower_dir)
    processor = LlavaCodebaseProcessor(tokenizer, image_processor, image_aspect_ratio=cfg.get("image_aspect_ratio"),
                                       chat_template=CHAT_TEMPLATES[chat or DEFAULT_CHAT[mt]])
    return model, processor


__all__ = ["CHAT_TEMPLATES", "CLASSES", "CLIPTower", "DEFAULT_CHAT", "LlavaCodebaseMixin", "LlavaCodebaseProcessor",
           "LlavaLlamaConfig", "LlavaLlamaForCausalLM", "LlavaMistralConfig", "LlavaMistralForCausalLM",
           "LlavaQwen2Config", "LlavaQwen2ForCausalLM", "SpliceBatch", "build_projector", "checkpoint_tensors",
           "expand2square", "load_checkpoint", "projector_depth", "splice_embeddings"]
