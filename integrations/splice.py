"""Splice family: LLaVA-codebase models whose image features replace a sentinel id before
a transformers CausalLM runs.

Covered: HuatuoGPT-Vision (``LlavaQwen2ForCausalLM``, a Qwen2 LLM), the original LLaVA-1.5
and LLaVA-Med (``LlavaLlamaForCausalLM``, ``LlavaMistralForCausalLM``), VILA / VILA-M3 /
NVILA (``LlavaLlamaModel`` with the LLM at ``.llm``). Checkpoints of the first three load
without the original package through :func:`load_llava_checkpoint` (classes in
:mod:`.llava_codebase`, which the built-in ``tiny-splice`` model also uses); VILA is
covered by the stand-in of :mod:`vgkernels.integrations.tiny`.

The contract this shim relies on (and nothing more):

1. **Where the LLM sits.** ``model.llm`` when it exists (VILA), else the model itself is
   the CausalLM (LLaVA codebase: the class subclasses ``Qwen2ForCausalLM`` /
   ``LlamaForCausalLM``). The decoder layers are then ``<llm>.model.layers``, transformers
   modules whose attention goes through ``config._attn_implementation``.
2. **What the user passes.** ``forward(input_ids, attention_mask, images, ...)`` or
   ``generate(inputs | input_ids, images, attention_mask, ...)`` with ``input_ids`` holding
   ``IMAGE_TOKEN_INDEX = -200`` once per image (``tokenizer_image_token``). The shim reads
   those ids and the user's ``attention_mask`` from the call; ``image_sizes`` (PIL
   ``(width, height)`` per image) when the call has them.
3. **How the splice works.** For each sample, the real ids in order with the ``i``-th
   sentinel replaced by the ``N`` feature rows of its image; samples padded to the longest,
   on either side (``tokenizer_padding_side``). The LLM then receives ``inputs_embeds`` and
   the new ``attention_mask``. Every image of a model has the same ``N`` (a fixed grid).
   So in the mask the decoder receives, sample ``b``'s real tokens are one contiguous run
   starting at ``f_b``; with ``T_b`` text tokens and ``m_b`` sentinels,
   ``N = (real length − T_b) / m_b``, and image ``j`` starts at ``f_b + k_j + j(N − 1)``
   where ``k_j`` is the sentinel's index among the real ids. The shim checks that the
   counts add up and raises otherwise (e.g. after the codebase's truncation to
   ``tokenizer_model_max_length``).
4. **How N maps to the image.** ``N = g²`` tokens of a square ``g × g`` grid, or
   ``g² + 1`` with the CLS token first when ``config.mm_vision_select_feature ==
   "cls_patch"`` (its cell is a NaN row: it has no place). LLaVA-1.5 /
   HuatuoGPT / LLaVA-Med emit it row-major. VILA-1.5 / VILA-M3's ``mlp_downsample``
   projector (``config.mm_projector_type == "mlp_downsample"``) reshapes with its
   ``flat_square`` so that the merged tokens come **column-major**: sequence token ``s``
   sits at ``(y, x) = (s mod g, s div g)``. The shim reorders to row-major
   (``extra["sequence_order"]``); ``token_order="row" | "column"`` overrides the rule.
5. **Geometry** (``config.image_aspect_ratio``): ``"pad"`` is ``expand2square`` (pad the
   short side, centred, with the mean colour) then resize to the tower's side; ``"resize"``
   squashes to a square; anything else is CLIP's shortest-side resize and centre crop.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import (Shim, call_arg, cls_row, expand2square_cells, find_decoder, layout, perfect_square,
                   resize_crop_cells, size_pairs, squash_cells)

from vgkernels.constants import IMAGE_TOKEN_INDEX


class SpliceShim(Shim):
    family = "splice"
    image_token_id = IMAGE_TOKEN_INDEX
    ids_are_columns = False

    def __init__(self, model, processor=None, token_order: Optional[str] = None, image_side: Optional[int] = None):
        super().__init__(model, processor)
        cfg = getattr(model, "config", None)
        if token_order is None:
            token_order = "column" if getattr(cfg, "mm_projector_type", None) == "mlp_downsample" else "row"
        if token_order not in ("row", "column"):
            raise ValueError(f"splice: token_order must be 'row' or 'column', got {token_order!r}")
        self.token_order = token_order
        self.aspect = getattr(cfg, "image_aspect_ratio", "pad")
        self.cls_first = getattr(cfg, "mm_vision_select_feature", "patch") == "cls_patch"
        self.side = image_side or _processed_side(model, processor)

    @classmethod
    def matches(cls, model) -> bool:
        if hasattr(model, "prepare_inputs_labels_for_multimodal"):
            return True
        cfg = getattr(model, "config", None)
        has_llm = hasattr(model, "llm") and hasattr(getattr(model, "llm"), "generate")
        return has_llm and (hasattr(model, "mm_projector") or hasattr(cfg, "mm_projector_type"))

    def llm(self):
        return getattr(self.model, "llm", None) or self.model

    @staticmethod
    def process(processor, images, texts) -> dict:
        # the LLaVA codebase pads after splicing, on its own side; its ids come unpadded-right
        return dict(processor(images=images, text=texts, padding_side="right"))

    def decoder(self):
        return find_decoder(self.llm())

    def generate_owners(self) -> list:
        owners = [self.model]
        if self.llm() is not self.model:
            owners.append(self.llm())
        return owners

    def observe(self, args, kwargs):
        ids = call_arg(args, kwargs, "input_ids", 0)
        if ids is None:
            ids = call_arg(args, kwargs, "inputs")
        if ids is None or not isinstance(ids, torch.Tensor):
            return None  # an inner call with inputs_embeds: keep the outer call's record
        images = call_arg(args, kwargs, "images", 2)
        return {"input_ids": ids, "attention_mask": call_arg(args, kwargs, "attention_mask", 1),
                "image_sizes": kwargs.get("image_sizes"), "has_pixels": images is not None}

    def spans(self, record, mask, image_sizes):
        ids = record.get("input_ids")
        if ids is None:
            raise ValueError("splice: no call with input_ids (holding the -200 image sentinel) preceded this prefill")
        umask = record.get("attention_mask")
        umask = torch.ones_like(ids, dtype=torch.bool) if umask is None else umask.to(torch.bool)
        if ids.shape[0] != mask.shape[0]:
            raise ValueError(f"splice: the call had {ids.shape[0]} samples, the LLM received {mask.shape[0]}")
        found = []
        for b in range(ids.shape[0]):
            real = ids[b][umask[b].to(ids.device)]
            sent = torch.nonzero(real == IMAGE_TOKEN_INDEX).flatten().tolist()
            if not sent:
                raise ValueError(
                    f"splice: sample {b} has no image sentinel (IMAGE_TOKEN_INDEX={IMAGE_TOKEN_INDEX}) in input_ids"
                )
            pos = torch.nonzero(mask[b]).flatten()
            R = pos.numel()
            f = int(pos[0]) if R else 0
            if R and int(pos[-1]) - f + 1 != R:
                raise ValueError(f"splice: sample {b}'s real tokens are not contiguous in the LLM's attention_mask")
            n_all = R - (real.numel() - len(sent))
            if n_all <= 0 or n_all % len(sent):
                raise ValueError(
                    f"splice: sample {b} has {len(sent)} sentinel(s) and {real.numel() - len(sent)} text tokens, but the "
                    f"LLM received {R} real tokens; the splice does not add up (truncated?)"
                )
            n = n_all // len(sent)
            found.append([(f + k + j * (n - 1), n) for j, k in enumerate(sent)])
        ns = {n for per in found for _, n in per}
        if len(ns) > 1:
            raise ValueError(f"splice: images got different token counts {sorted(ns)}; the family has a fixed grid")
        n_images = sum(len(p) for p in found)
        sizes = size_pairs(image_sizes, n_images, "splice")
        if sizes is None and record.get("image_sizes") is not None:
            sizes = size_pairs(record["image_sizes"], n_images, "splice, from the call's image_sizes")
        out, i = [], 0
        for per in found:
            lays = []
            for s, n in per:
                g = perfect_square(n - int(self.cls_first), "splice")
                size = sizes[i] if sizes is not None else None
                cells = self._cells((g, g), size)
                if self.cls_first:
                    cells = cls_row(cells)
                extra = {"family": "splice"}
                if self.token_order == "column":
                    if self.cls_first:
                        raise ValueError("splice: column-major tokens with a CLS token are not supported")
                    t = torch.arange(n)
                    # row-major token t = (y, x) sits at sequence offset x·g + y
                    extra["sequence_order"] = (t % g) * g + t // g
                lays.append(layout(s, cells, (g, g), size, **extra))
                i += 1
            out.append(lays)
        return out

    def _cells(self, grid, size):
        side = self.side or grid[0]
        if self.aspect == "pad":
            return expand2square_cells(grid, size, side)
        if self.aspect == "resize":
            return squash_cells(grid, size, (side, side))
        return resize_crop_cells(grid, size, side, (side, side))


def load_llava_checkpoint(path: str, *, vision_tower: Optional[str] = None, torch_dtype=None, device_map=None,
                          attn_implementation: Optional[str] = None, chat: Optional[str] = None):
    """Load a LLaVA-codebase checkpoint directory without the original package.

    ``path`` holds ``config.json`` with ``model_type`` ``llava_qwen2`` (HuatuoGPT-Vision),
    ``llava_llama`` (LLaVA-1.5) or ``llava_mistral`` (LLaVA-Med v1.5), the weights under the
    code base's names (``model.safetensors`` or its sharded index; ``pytorch_model*.bin``
    read with ``torch.load(weights_only=True)``) and the tokenizer files. Nothing runs
    ``trust_remote_code``.

    Parameters
    ----------
    vision_tower
        Local directory of the CLIP tower (``config.json``, ``preprocessor_config.json``,
        weights). Default: the config's ``mm_vision_tower`` as a path, absolute or
        relative to ``path``; a hub id is refused with what to do (nothing is downloaded).
        Vision weights saved in the checkpoint (``model.vision_tower.*``) override the
        tower's own.
    torch_dtype
        dtype of the model (default: transformers' ``from_pretrained`` default).
    device_map
        A device (``"cuda"``, ``"cuda:1"``, ``torch.device``): the model is moved there;
        ``"auto"`` or a dict: handed to ``from_pretrained`` (needs ``accelerate``).
    attn_implementation
        The LLM's attention (default: transformers' choice, sdpa).
    chat
        Chat format: ``"huatuo"``, ``"vicuna_v1"`` or ``"mistral_instruct"``; default by
        ``model_type`` (in that order).

    Returns ``(model, processor)``: the model (eval mode) is a transformers
    ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` / ``MistralForCausalLM`` subclass
    (:mod:`.llava_codebase`) whose ``forward``/``generate`` take ``images=`` and splice
    them at ``IMAGE_TOKEN_INDEX``; the processor applies ``mm_vision_select_layer`` /
    ``_feature``, ``image_aspect_ratio`` (``"pad"``: ``expand2square`` with the image
    mean colour) and the chat format. Unsupported settings (``mm_projector_type`` other
    than ``linear`` / ``mlp<N>x_gelu``, anyres tiling, image start/end tokens) raise
    ``ValueError`` naming the field.
    """
    from .llava_codebase import load_checkpoint

    return load_checkpoint(path, vision_tower=vision_tower, torch_dtype=torch_dtype, device_map=device_map,
                           attn_implementation=attn_implementation, chat=chat)


def _processed_side(model, processor) -> Optional[int]:
    """The side of the square image the vision tower receives, from wherever it is found."""
    for obj, attr in ((processor, "image_size"), (getattr(processor, "image_processor", None), "crop_size")):
        v = getattr(obj, attr, None) if obj is not None else None
        if isinstance(v, dict):
            v = v.get("height")
        if isinstance(v, int):
            return v
    get = getattr(model, "get_vision_tower", None)
    vt = get() if callable(get) else getattr(model, "vision_tower", None)
    for obj in (vt, getattr(vt, "config", None)):
        v = getattr(obj, "image_size", None) if obj is not None else None
        if isinstance(v, int):
            return v
    return None
