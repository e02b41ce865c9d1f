"""Tiny, randomly initialised vision-language models with working processors, built offline.

Every model here is built from a config object with a fixed seed, and every processor
from in-memory parts: a byte-level tokenizer made with the ``tokenizers`` library (so
any text encodes, one token per byte, plus the family's special tokens and a chat
template) and image processors constructed from arguments. Nothing is downloaded. They
exist for tests, examples and benchmarks of :func:`vgkernels.patch_model`: the weights
are random, so generated text is gibberish, but every code path of the real families
runs (vision tower, projector, image-token expansion, M-RoPE, anyres tiles, KV cache).

``build_tiny(name, seed=0, **overrides) -> (model, processor)`` with ``name`` in
:data:`TINY_MODELS`:

=====================  ===========================================================
``tiny-llava``         ``LlavaForConditionalGeneration``: CLIP vision tower, Llama LLM,
                       ``<image>`` expanded to ``(image_size / patch)²`` tokens; HF
                       processor (resize shortest side, centre crop).
``tiny-llava-next``    ``LlavaNextForConditionalGeneration``: anyres base grid then
                       unpadded tiles with a newline column.
``tiny-qwen2-vl``      ``Qwen2VLForConditionalGeneration``: ``<|image_pad|>`` runs from
                       ``image_grid_thw`` with the 2×2 merge, M-RoPE; ``smart_resize``.
``tiny-qwen2.5-vl``    ``Qwen2_5_VLForConditionalGeneration`` (windowed vision attention).
``tiny-splice``        ``LlavaQwen2ForCausalLM`` (:mod:`vgkernels.integrations.llava_codebase`),
                       the class HuatuoGPT-Vision checkpoints load into: a transformers
                       ``Qwen2ForCausalLM`` whose image features replace the sentinel
                       ``-200`` before the LLM runs; random weights.
``tiny-splice-vila``   :class:`TinyVilaForCausalLM`, a stand-in for VILA / VILA-M3 / NVILA:
                       the LLM sits at ``.llm`` and ``mlp_downsample`` emits its tokens in
                       column-major order.
``tiny-grounded``      ``LlavaForConditionalGeneration`` like ``tiny-llava`` (same
                       processor classes and chat template) whose weights are set by
                       construction: three planted heads attend to the image tokens of
                       the colour the question names (:mod:`vgkernels.integrations.tiny_grounded`);
                       its sizes are fixed by the construction.
=====================  ===========================================================

Size keywords (all families): ``num_layers`` (4), ``hidden_size`` (64), ``num_heads`` (4),
``num_kv_heads`` (2), ``intermediate_size`` (128), ``max_position_embeddings`` (4096),
``attn_implementation`` (``"sdpa"``; ``"eager"`` for a reference model), ``image_size``
(the vision tower's input side in pixels) and ``dtype`` (float32). A long-sequence
variant for benchmarks is simply ``build_tiny(name, num_heads=8, max_position_embeddings=8192)``
with a long prompt.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
from torch import nn

from vgkernels.constants import IMAGE_TOKEN_INDEX

TINY_MODELS = (
    "tiny-llava",
    "tiny-llava-next",
    "tiny-qwen2-vl",
    "tiny-qwen2.5-vl",
    "tiny-splice",
    "tiny-splice-vila",
    "tiny-grounded",
)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SIZE_KEYS = (
    "num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size",
    "max_position_embeddings", "attn_implementation", "image_size", "dtype",
)
# Keywords a model name may carry (``tiny-llava:num_layers=8``): the sizes but the dtype,
# which the commands set with --dtype.
NAME_KEYWORDS = tuple(k for k in _SIZE_KEYS if k != "dtype")


def _tf_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


# ----------------------------------------------------------------------------- tokenizer


def byte_tokenizer(specials: Sequence[str], *, pad: str, eos: str, bos: Optional[str] = None,
                   chat_template: Optional[str] = None, padding_side: str = "left", extra: Optional[dict] = None,
                   words: Sequence[str] = ()):
    """A ``PreTrainedTokenizerFast`` over the 256 byte-level symbols plus ``specials``.

    No merges: every byte is one token, so any text encodes and decodes exactly; the
    special tokens get ids ``256, 257, ...`` in the order given. ``words`` are then added
    as ordinary (not special) tokens that match whole words only, as a real vocabulary's
    word tokens would (``tiny-grounded`` gives its colour names one token each).
    """
    import tokenizers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    if words:
        tok.add_tokens([tokenizers.AddedToken(w, single_word=True, normalized=False) for w in words])
    kwargs = dict(tokenizer_object=tok, pad_token=pad, eos_token=eos, padding_side=padding_side,
                  model_input_names=["input_ids", "attention_mask"])
    if bos is not None:
        kwargs["bos_token"] = bos
    if extra:
        kwargs.update(extra)
    fast = PreTrainedTokenizerFast(**kwargs)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


# A LLaVA-1.5-style template ("USER: <image>\n... ASSISTANT:") over the message format
# of HF processors: content is a list of {"type": "image"} / {"type": "text", ...}.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] if message['content'] is not string else message['content'] }}\n"
    "{% else %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Qwen's ChatML with <|vision_start|><|image_pad|><|vision_end|> per image.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------- configs


def _sizes(overrides: dict) -> dict:
    s = dict(
        num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
        max_position_embeddings=4096, attn_implementation="sdpa", image_size=None, dtype=torch.float32,
    )
    for k in list(overrides):
        if k in _SIZE_KEYS:
            s[k] = overrides.pop(k)
    if s["hidden_size"] % s["num_heads"] or s["num_heads"] % s["num_kv_heads"]:
        raise ValueError(
            f"hidden_size={s['hidden_size']} must divide by num_heads={s['num_heads']}, which must divide by "
            f"num_kv_heads={s['num_kv_heads']}"
        )
    return s


def _text_kwargs(s: dict, vocab_size: int, pad_id: int, eos_id: int, bos_id: Optional[int]) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"],
        max_position_embeddings=s["max_position_embeddings"],
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        tie_word_embeddings=False,
    )


def _clip_vision(image_size: int, patch: int = 14) -> dict:
    return dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, image_size=image_size, patch_size=patch, projection_dim=32,
    )


def _finish(model, s: dict, seed: int):
    model = model.to(s["dtype"]).eval()
    # generate() stops nowhere on random weights unless told; tests pass max_new_tokens.
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        gc.do_sample = False
    return model


def _init(cls, config, seed: int, attn: str):
    torch.manual_seed(seed)
    try:
        return cls._from_config(config, attn_implementation=attn)
    except TypeError:  # pragma: no cover - very old signatures
        config._attn_implementation = attn
        return cls(config)


# ----------------------------------------------------------------------------- llava


def _llava_tokenizer(words: Sequence[str] = ()):
    return byte_tokenizer(
        ["<pad>", "<s>", "</s>", "<image>"], pad="<pad>", eos="</s>", bos="<s>",
        chat_template=LLAVA_CHAT_TEMPLATE, extra={"image_token": "<image>"} if _tf_major() >= 5 else None,
        words=words,
    )


def _clip_image_processor(image_size: int, next_pinpoints=None):
    import transformers

    major = _tf_major()
    kw = dict(
        do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
        resample=3,  # bicubic, as CLIP
    )
    if next_pinpoints is not None:
        cls = transformers.LlavaNextImageProcessorPil if major >= 5 else transformers.LlavaNextImageProcessor
        kw["image_grid_pinpoints"] = next_pinpoints
        kw["do_pad"] = True
        return cls(**kw)
    cls = transformers.CLIPImageProcessorPil if major >= 5 else transformers.CLIPImageProcessor
    return cls(**kw)


def build_llava(seed: int = 0, **overrides):
    """``LlavaForConditionalGeneration`` (CLIP ViT + Llama) and its ``LlavaProcessor``.

    ``image_size`` (default 56, patch 14) gives ``(image_size/14)²`` image tokens (16).
    """
    import transformers

    s = _sizes(overrides)
    image_size = s["image_size"] or 56
    tok = _llava_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<image>")}
    text = transformers.LlamaConfig(**_text_kwargs(s, len(tok), ids["<pad>"], ids["</s>"], ids["<s>"]))
    cfg = transformers.LlavaConfig(
        vision_config=_clip_vision(image_size), text_config=text, image_token_index=ids["<image>"],
        image_seq_length=(image_size // 14) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=-2, projector_hidden_act="gelu", **overrides,
    )
    cfg.pad_token_id = ids["<pad>"]
    model = _finish(_init(transformers.LlavaForConditionalGeneration, cfg, seed, s["attn_implementation"]), s, seed)
    proc = transformers.LlavaProcessor(
        image_processor=_clip_image_processor(image_size), tokenizer=tok, patch_size=14,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, proc


def build_llava_next(seed: int = 0, **overrides):
    """``LlavaNextForConditionalGeneration``: base ``(image_size/14)²`` grid then anyres tiles.

    ``image_size`` defaults to 28 (a 2×2 base grid) with pinpoints ``[[28, 56], [56, 28], [56, 56]]``
    so an image gets at most 2×2 tiles of 2×2 features plus a newline per feature row.
    """
    import transformers

    s = _sizes(overrides)
    image_size = s["image_size"] or 28
    pinpoints = overrides.pop("image_grid_pinpoints", [[image_size, 2 * image_size], [2 * image_size, image_size],
                                                       [2 * image_size, 2 * image_size]])
    tok = _llava_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<image>")}
    text = transformers.LlamaConfig(**_text_kwargs(s, len(tok), ids["<pad>"], ids["</s>"], ids["<s>"]))
    cfg = transformers.LlavaNextConfig(
        vision_config=_clip_vision(image_size), text_config=text, image_token_index=ids["<image>"],
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=(image_size // 14) ** 2, **overrides,
    )
    cfg.pad_token_id = ids["<pad>"]
    model = _finish(_init(transformers.LlavaNextForConditionalGeneration, cfg, seed, s["attn_implementation"]), s, seed)
    proc = transformers.LlavaNextProcessor(
        image_processor=_clip_image_processor(image_size, next_pinpoints=pinpoints), tokenizer=tok, patch_size=14,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, proc


# ----------------------------------------------------------------------------- qwen


_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def _qwen_tokenizer():
    extra = None
    if _tf_major() >= 5:
        extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
    return byte_tokenizer(_QWEN_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>", chat_template=QWEN_CHAT_TEMPLATE,
                          extra=extra)


def _qwen_image_processor(patch: int, min_pixels: int, max_pixels: int):
    import transformers

    cls = transformers.Qwen2VLImageProcessorPil if _tf_major() >= 5 else transformers.Qwen2VLImageProcessor
    return cls(
        do_resize=True, min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch, temporal_patch_size=2,
        merge_size=2, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD), do_convert_rgb=True,
    )


def _build_qwen(version: str, seed: int, overrides: dict):
    import transformers

    s = _sizes(overrides)
    patch = 14
    head_dim = s["hidden_size"] // s["num_heads"]
    half = head_dim // 2
    # M-RoPE splits the rotary half-dimensions between (t, h, w); any split summing to half works.
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    side = s["image_size"] or 112
    min_pixels = overrides.pop("min_pixels", (2 * patch) ** 2 * 4)
    max_pixels = overrides.pop("max_pixels", side * side)
    tok = _qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    text_kw = _text_kwargs(s, len(tok), ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|endoftext|>"])
    text_kw["rope_scaling"] = {"type": "mrope", "mrope_section": mrope, "rope_type": "default"}
    text_kw["rope_theta"] = 10000.0
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=s["hidden_size"], num_heads=2, mlp_ratio=2,
                      patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        cfg_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=2, hidden_size=32, out_hidden_size=s["hidden_size"], intermediate_size=64, num_heads=2,
                      patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      window_size=4 * patch, fullatt_block_indexes=[1])
        cfg_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if _tf_major() >= 5:
        cfg = cfg_cls(text_config=text_kw, vision_config=vision, **common, **overrides)
    else:
        # 4.57 reads the text fields from the flat top-level config as well as text_config.
        cfg = cfg_cls(text_config=dict(text_kw), vision_config=vision, **text_kw, **common, **overrides)
    cfg.pad_token_id = ids["<|endoftext|>"]
    model = _finish(_init(model_cls, cfg, seed, s["attn_implementation"]), s, seed)
    ip = _qwen_image_processor(patch, min_pixels, max_pixels)
    proc_cls = transformers.Qwen2VLProcessor if version == "2" else transformers.Qwen2_5_VLProcessor
    proc = _qwen_processor(proc_cls, ip, tok)
    return model, proc


def _qwen_processor(proc_cls, ip, tok):
    """The family's processor without its video processor, whose class needs torchvision
    (not installed here); images never touch it."""
    from transformers.processing_utils import ProcessorMixin

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    # 4.57 lists a processor's parts in ``attributes``; 5.x reads them from __init__'s signature.
    cls = type(proc_cls.__name__, (proc_cls,), {"__init__": __init__, "__module__": __name__,
                                                "attributes": ["image_processor", "tokenizer"],
                                                "tokenizer_class": "PreTrainedTokenizerFast"})
    return cls(image_processor=ip, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)


def build_qwen2_vl(seed: int = 0, **overrides):
    """``Qwen2VLForConditionalGeneration`` and ``Qwen2VLProcessor``.

    ``image_size`` (default 112) bounds ``max_pixels = image_size²``; an image of
    ``h × w`` pixels gets ``smart_resize`` to multiples of 28 and then
    ``(h'/28)(w'/28)`` ``<|image_pad|>`` tokens (16 for 112×112).
    """
    return _build_qwen("2", seed, overrides)


def build_qwen2_5_vl(seed: int = 0, **overrides):
    """``Qwen2_5_VLForConditionalGeneration`` and ``Qwen2_5_VLProcessor`` (see :func:`build_qwen2_vl`)."""
    return _build_qwen("2.5", seed, overrides)


# ----------------------------------------------------------------------------- splice stand-ins


def _tiny_clip_tower(image_size: int, seed: int, select_feature: str = "patch"):
    """A random tiny CLIP ViT as the LLaVA code base wraps it (penultimate layer)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vgkernels.integrations.llava_codebase import CLIPTower

    cfg = CLIPVisionConfig(**{k: v for k, v in _clip_vision(image_size).items() if k != "model_type"})
    torch.manual_seed(seed + 1)
    return CLIPTower(CLIPVisionModel(cfg), select_layer=-2, select_feature=select_feature)


def _splice_processor(tok, image_size: int, chat: str):
    """The LLaVA code base's preprocessing (``expand2square`` + CLIP, ``tokenizer_image_token``)."""
    from vgkernels.integrations.llava_codebase import CHAT_TEMPLATES, LlavaCodebaseProcessor

    return LlavaCodebaseProcessor(tok, _clip_image_processor(image_size), image_aspect_ratio="pad",
                                  chat_template=CHAT_TEMPLATES[chat])


class TinyVilaForCausalLM(nn.Module):
    """Stand-in for VILA / VILA-M3 / NVILA (``LlavaLlamaModel``): the LLM is a transformers
    CausalLM at ``self.llm`` (decoder layers ``llm.model.layers``).

    What each part mirrors:

    - ``vision_tower`` then ``mm_projector`` of type ``mlp_downsample``: features of a
      ``(g, g)`` patch grid are merged 2×2 into ``(g/2, g/2)`` tokens. VILA's
      ``flat_square`` reshapes ``(n, h, w, c)`` so that, read in sequence order, the
      merged tokens go down the columns first: token ``t`` sits at
      ``(y, x) = (t % (g/2), t // (g/2))`` — column-major. The shim reorders to row-major.
      ``column_major=False`` gives a row-major projector instead.
    - ``_embed(input_ids, media, attention_mask)`` splices the features at the
      sentinels (:func:`vgkernels.integrations.llava_codebase.splice_embeddings`) and
      returns ``(inputs_embeds, attention_mask)``.
    - ``forward`` and ``generate`` call ``self.llm`` with ``inputs_embeds`` only.
    """

    def __init__(self, llm, vision, column_major: bool = True, tokenizer_padding_side: str = "right"):
        super().__init__()
        self.llm = llm
        self.config = copy.copy(llm.config)
        self.config.tokenizer_padding_side = tokenizer_padding_side
        self.config.mm_projector_type = "mlp_downsample"
        self.config.model_type = "vila"
        self.vision_tower = vision
        self.column_major = column_major
        c = vision.hidden_size
        h = llm.config.hidden_size
        self.mm_projector = nn.Sequential(nn.LayerNorm(4 * c), nn.Sequential(nn.Linear(4 * c, h), nn.GELU(),
                                                                              nn.Linear(h, h)))

    @property
    def device(self):
        return self.llm.device

    @property
    def generation_config(self):
        return self.llm.generation_config

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, g², c) -> (n, (g/2)², 4c)``: 2×2 neighbours concatenated, merged tokens in
        column-major (``column_major``) or row-major order."""
        n, L, c = x.shape
        g = int(math.isqrt(L))
        h = g // 2
        x = x.reshape(n, h, 2, h, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, h, 4 * c)  # (n, y, x, 4c)
        if self.column_major:
            x = x.transpose(1, 2)
        return x.reshape(n, h * h, 4 * c)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.mm_projector(self.downsample(self.vision_tower(images)))

    def _embed(self, input_ids, media, attention_mask):
        from vgkernels.integrations.llava_codebase import splice_embeddings

        return splice_embeddings(self.llm.get_input_embeddings(), input_ids, attention_mask,
                                 list(self.encode_images(media)),
                                 padding_side=getattr(self.config, "tokenizer_padding_side", "right"))

    def forward(self, input_ids=None, attention_mask=None, images=None, image_sizes=None, **kw):
        emb, mask = self._embed(input_ids, images, attention_mask)
        return self.llm(inputs_embeds=emb, attention_mask=mask, **kw)

    @torch.no_grad()
    def generate(self, input_ids=None, images=None, image_sizes=None, attention_mask=None, **kw):
        emb, mask = self._embed(input_ids, images, attention_mask)
        return self.llm.generate(inputs_embeds=emb, attention_mask=mask, **kw)


def _build_splice(kind: str, seed: int, overrides: dict):
    import transformers

    from vgkernels.integrations.llava_codebase import LlavaQwen2Config, LlavaQwen2ForCausalLM

    s = _sizes(overrides)
    side = s["image_size"] or (56 if kind == "llava" else 112)
    padding_side = overrides.pop("tokenizer_padding_side", "right")
    column_major = overrides.pop("column_major", True)
    select_feature = overrides.pop("mm_vision_select_feature", "patch")
    if overrides:
        raise ValueError(f"build_tiny: unknown keyword(s) for tiny-splice: {sorted(overrides)}")
    tok = _llava_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>")}
    text_kw = _text_kwargs(s, len(tok), ids["<pad>"], ids["</s>"], ids["<s>"])
    vision = _tiny_clip_tower(side, seed, select_feature)
    if kind == "llava":
        cfg = LlavaQwen2Config(**text_kw, mm_hidden_size=vision.hidden_size, mm_projector_type="mlp2x_gelu",
                               mm_vision_tower="tiny-clip", mm_vision_select_layer=-2,
                               mm_vision_select_feature=select_feature, image_aspect_ratio="pad",
                               tokenizer_padding_side=padding_side)
        model = _init(LlavaQwen2ForCausalLM, cfg, seed, s["attn_implementation"])
        model.attach_vision_tower(vision)
        chat = "huatuo"
    else:
        llm = _init(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**text_kw), seed, s["attn_implementation"])
        torch.manual_seed(seed + 2)
        model = TinyVilaForCausalLM(llm, vision, column_major=column_major, tokenizer_padding_side=padding_side)
        llm.generation_config.do_sample = False
        chat = "vicuna_v1"
    model = _finish(model, s, seed)
    return model, _splice_processor(tok, side, chat)


def build_splice(seed: int = 0, **overrides):
    """:class:`~vgkernels.integrations.llava_codebase.LlavaQwen2ForCausalLM` — the class
    HuatuoGPT-Vision checkpoints load into — with random weights, a tiny CLIP tower and
    the code base's preprocessing (:class:`~vgkernels.integrations.llava_codebase.LlavaCodebaseProcessor`,
    HuatuoGPT-Vision's chat format).

    ``image_size`` defaults to 56: ``(56/14)² = 16`` features per image.
    ``tokenizer_padding_side`` (``"right"``) is where the splice pads;
    ``mm_vision_select_feature="cls_patch"`` keeps the CLS feature (17 tokens).
    """
    return _build_splice("llava", seed, overrides)


def build_splice_vila(seed: int = 0, **overrides):
    """:class:`TinyVilaForCausalLM` (VILA-M3-like, column-major) and the code base's processor.

    ``image_size`` defaults to 112: an 8×8 patch grid merged to 4×4 = 16 tokens.
    """
    return _build_splice("vila", seed, overrides)


def build_grounded(seed: int = 0, **overrides):
    """``tiny-grounded``: a ``tiny-llava``-like model with planted grounding heads; see
    :mod:`vgkernels.integrations.tiny_grounded`."""
    from .tiny_grounded import build_grounded as build

    return build(seed, **overrides)


_BUILDERS = {
    "tiny-llava": build_llava,
    "tiny-llava-next": build_llava_next,
    "tiny-qwen2-vl": build_qwen2_vl,
    "tiny-qwen2.5-vl": build_qwen2_5_vl,
    "tiny-splice": build_splice,
    "tiny-splice-vila": build_splice_vila,
    "tiny-grounded": build_grounded,
}


def build_tiny(name: str, seed: int = 0, **overrides):
    """Build ``(model, processor)`` for one of :data:`TINY_MODELS`, weights drawn with ``seed``.

    Size keywords: see the module docstring; other keywords go to the model config.
    """
    if name not in _BUILDERS:
        raise ValueError(f"build_tiny: unknown model {name!r}; expected one of {list(TINY_MODELS)}")
    _check_overrides(name, overrides)
    return _BUILDERS[name](seed, **overrides)


# The transformers config each HF-class tiny model passes its other keywords to, and the
# keywords a builder reads itself. Config classes accept any keyword, so a typo
# ("num_layer") would otherwise be stored and ignored.
_CONFIG_OF = {"tiny-llava": "LlavaConfig", "tiny-llava-next": "LlavaNextConfig", "tiny-qwen2-vl": "Qwen2VLConfig",
              "tiny-qwen2.5-vl": "Qwen2_5_VLConfig"}
_BUILDER_KEYS = {"tiny-llava-next": ("image_grid_pinpoints",), "tiny-qwen2-vl": ("min_pixels", "max_pixels"),
                 "tiny-qwen2.5-vl": ("min_pixels", "max_pixels")}


def _check_overrides(name: str, overrides: dict) -> None:
    import inspect

    rest = [k for k in overrides if k not in _SIZE_KEYS and k not in _BUILDER_KEYS.get(name, ())]
    if not rest or name not in _CONFIG_OF:
        return
    import transformers

    cls = getattr(transformers, _CONFIG_OF[name])
    known = set(inspect.signature(cls.__init__).parameters) | set(cls().to_dict())
    bad = sorted(k for k in rest if k not in known)
    if bad:
        raise ValueError(f"build_tiny: unknown keyword(s) {bad} for {name}: expected size keywords "
                         f"{list(_SIZE_KEYS)} or fields of transformers.{_CONFIG_OF[name]}")


def test_image(width: int, height: int, seed: int = 0):
    """A deterministic RGB PIL image of ``width × height`` with some structure (noise
    plus a bright rectangle), for tests and examples."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8)
    x[height // 4: height // 2, width // 3: (2 * width) // 3] = 240
    return Image.fromarray(x.numpy(), "RGB")
