"""What every family shim provides, and the geometry helpers they share.

A shim answers three questions about one model instance, and knows nothing of the
kernels (:mod:`vgkernels.integrations.patch` asks the questions and runs the kernels):

1. **Where the decoder is.** :meth:`Shim.decoder` is the transformers module that owns
   ``.layers`` and whose ``forward`` receives the LLM's ``attention_mask`` and
   ``past_key_values``; :meth:`Shim.layers` lists its decoder layers, each with a
   ``self_attn`` whose ``config._attn_implementation`` picks the attention function.
2. **What the user called.** :meth:`Shim.observe` sees the arguments of every call of
   the model's ``forward`` and ``generate`` and keeps what it needs (ids, image grids,
   image sizes) for the next prefill.
3. **Where the images are.** :meth:`Shim.spans` turns that record and the mask the
   decoder received, ``(B, S)`` bool, into one list of :class:`vgkernels.ImageLayout`
   per sample: absolute key positions (left padding included), ``N``, the main grid and
   each token's cell in original-image pixels, in row-major order. A family whose
   sequence order is not row-major stores ``extra["sequence_order"]``: ``(N,)`` int64,
   the sequence offset (from ``key_start``) of row-major token ``t``.

Geometry: an image of ``(width, height)`` pixels goes through the family's processor
transform; the helpers below map each token's box back through it. Without the original
size (``image_size`` None) cells are in the pixels of the image the model received.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from vgkernels.layout import ImageLayout, grid_cells

Size = tuple[int, int]  # (width, height)


class Shim:
    """Base class of the family shims (see the module docstring)."""

    family: str = ""
    #: whether the ids a call receives are the LLM's columns one for one (HF VLMs expand
    #: the image placeholder in the ids; the LLaVA codebase splices embeddings instead)
    ids_are_columns: bool = True
    #: whether the image token count depends on the image's size (variable grids)
    variable_tokens: bool = False
    #: forward/generate keywords that carry the images (any non-None one counts)
    pixel_keys: tuple = ("pixel_values", "mm_encoder_outputs")

    def __init__(self, model, processor=None):
        self.model = model
        self.processor = processor

    def decoder(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def layers(self) -> list:
        return list(self.decoder().layers)

    def llm(self):
        """The module that continues a KV cache from plain token ids (the model itself for
        HF VLMs; the inner CausalLM where the LLaVA codebase keeps one)."""
        return self.model

    def lm_head(self):
        return getattr(self.llm(), "lm_head", None)

    def text_stack(self):
        """The text model, its layers, embeddings and LM head (:class:`.continuation.TextStack`)."""
        from .continuation import make_stack

        return make_stack(self.decoder(), self.lm_head(), type(self.model).__name__)

    def image_token_ids(self) -> set:
        """Ids that mark image positions in a tokenised prompt."""
        return {int(self.image_token_id)}

    def suffix_positions(self, cached: int, k: int, B: int, device) -> Optional[torch.Tensor]:
        """Position ids of ``k`` text tokens appended after ``cached`` columns of a prompt
        whose last column is the image's; None when the model derives them from the cache."""
        return None

    @staticmethod
    def process(processor, images, texts) -> dict:
        """``processor(images, text)`` as the family's preprocessing is called (tensors)."""
        return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))

    @staticmethod
    def chat_text(processor, text: str) -> str:
        """``text`` after one image in the processor's chat template (a user turn and the
        assistant's generation prompt); the LLaVA-1.5 conversation format when it has none."""
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        tmpl = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                    "chat_template", None)
        if tmpl is None:
            return f"USER: <image>\n{text} ASSISTANT:"
        return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def generate_owners(self) -> list:
        """Objects whose ``generate`` the user (or the model itself) may call."""
        return [self.model]

    def observe(self, args: tuple, kwargs: dict) -> Optional[dict]:  # pragma: no cover - abstract
        """The record :meth:`spans` needs from one call's arguments, or None to keep the last
        one; ``record["has_pixels"]`` says whether the call carried images."""
        raise NotImplementedError

    def has_pixels(self, args: tuple, kwargs: dict) -> bool:
        return any(kwargs.get(k) is not None and not (isinstance(kwargs[k], dict) and not kwargs[k])
                   for k in self.pixel_keys)

    def spans(self, record: dict, mask: torch.Tensor, image_sizes: Optional[Sequence[Size]]) -> list[list[ImageLayout]]:
        raise NotImplementedError  # pragma: no cover - abstract


def find_decoder(model):
    """The module that owns the decoder ``layers`` of a transformers VLM or CausalLM."""
    for path in ("model.language_model", "language_model", "model"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "layers") and hasattr(getattr(obj, "layers"), "__len__"):
            return obj
    get = getattr(model, "get_decoder", None)
    if get is not None:
        dec = get()
        if hasattr(dec, "layers"):
            return dec
    raise ValueError(f"could not find the decoder layers of {type(model).__name__}")


def call_arg(args: tuple, kwargs: dict, name: str, position: Optional[int] = None):
    """``kwargs[name]``, else ``args[position]`` when given, else None."""
    if name in kwargs and kwargs[name] is not None:
        return kwargs[name]
    if position is not None and len(args) > position:
        return args[position]
    return None


def call_ids(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The token ids of a ``forward(input_ids=...)`` or ``generate(inputs=...)`` call."""
    ids = call_arg(args, kwargs, "input_ids", 0)
    return call_arg(args, kwargs, "inputs") if ids is None else ids


def prefill_ids(record: dict, mask: torch.Tensor, family: str, token: str) -> torch.Tensor:
    """The observed ``input_ids``, checked against the decoder's ``(B, S)`` mask; shims
    that find the image by its token (``token`` names it) cannot work from embeddings."""
    ids = record.get("input_ids")
    if ids is None:
        raise ValueError(
            f"{family}: the prefill call had no input_ids; patch_model finds the image by its token "
            f"({token}), so pass input_ids rather than inputs_embeds"
        )
    if ids.shape != mask.shape:
        raise ValueError(f"{family}: input_ids {tuple(ids.shape)} do not match the decoder's mask {tuple(mask.shape)}")
    return ids


def runs(row: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """Maximal runs ``(start, length)`` of ``token_id`` in a 1-D id tensor."""
    hit = (row == token_id).to(torch.int8)
    if not bool(hit.any()):
        return []
    d = torch.diff(torch.cat([hit.new_zeros(1), hit, hit.new_zeros(1)]))
    starts = torch.nonzero(d == 1).flatten().tolist()
    ends = torch.nonzero(d == -1).flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def size_pairs(image_sizes, n: int, what: str) -> Optional[list[Size]]:
    """Normalise user image sizes to ``n`` ``(width, height)`` int pairs (or None)."""
    if image_sizes is None:
        return None
    sizes = [tuple(int(v) for v in s) for s in image_sizes]
    if len(sizes) != n or any(len(s) != 2 for s in sizes):
        raise ValueError(
            f"image_sizes: expected one (width, height) pair per image, {n} in this batch ({what}), got {image_sizes!r}"
        )
    return sizes


def _map_cells(cells: torch.Tensor, offset: tuple[float, float], scale: tuple[float, float]) -> torch.Tensor:
    """``orig = (c - offset) / scale`` per axis, for ``(x0, y0, x1, y1)`` rows."""
    ox, oy = offset
    sx, sy = scale
    out = cells.clone()
    out[:, 0::2] = (cells[:, 0::2] - ox) / sx
    out[:, 1::2] = (cells[:, 1::2] - oy) / sy
    return out


def resize_crop_cells(grid: Size, image_size: Optional[Size], shortest_edge: int, crop: Size) -> torch.Tensor:
    """Cells of a ``grid = (gh, gw)`` over the centre crop of an image resized so that its
    shortest side is ``shortest_edge`` (HF CLIP / LLaVA processors).

    ``crop = (crop_w, crop_h)``. The resize maps ``(w, h)`` to ``(S, int(S·h/w))`` (or the
    transpose) as ``get_resize_output_image_size`` does; the crop starts at
    ``((W'-crop_w)//2, (H'-crop_h)//2)``. Cropped-away pixels get no token.
    """
    cw, ch = crop
    if image_size is None:
        return grid_cells(grid, (0.0, 0.0, float(cw), float(ch)))
    w, h = image_size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    left, top = (nw - cw) // 2, (nh - ch) // 2
    cells = grid_cells(grid, (float(left), float(top), float(left + cw), float(top + ch)))
    return _map_cells(cells, (0.0, 0.0), (nw / w, nh / h))


def expand2square_cells(grid: Size, image_size: Optional[Size], side: int) -> torch.Tensor:
    """Cells of a grid over the LLaVA codebase's ``expand2square`` canvas: the shorter side
    padded, centred (offset ``(max - w)//2``), then resized to ``side``. Cells over the
    padding lie outside ``[0, w) × [0, h)``."""
    if image_size is None:
        return grid_cells(grid, (0.0, 0.0, float(side), float(side)))
    w, h = image_size
    s = max(w, h)
    return grid_cells(grid, (-((s - w) // 2), -((s - h) // 2), s - (s - w) // 2, s - (s - h) // 2))


def squash_cells(grid: Size, image_size: Optional[Size], resized: Size) -> torch.Tensor:
    """Cells of a grid over an image resized per axis to ``resized = (W', H')`` (Qwen's
    ``smart_resize``, LLaVA-NeXT's base image, ``image_aspect_ratio="resize"``)."""
    W, H = resized
    if image_size is None:
        return grid_cells(grid, (0.0, 0.0, float(W), float(H)))
    w, h = image_size
    return grid_cells(grid, (0.0, 0.0, float(w), float(h)))


def cls_row(cells: torch.Tensor) -> torch.Tensor:
    """Prepend a NaN row (a CLS token that has no place)."""
    return torch.cat([torch.full((1, 4), float("nan"), dtype=cells.dtype), cells], dim=0)


def perfect_square(n: int, what: str) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{what}: {n} image tokens do not form a square grid; pass the grid explicitly")
    return g


def layout(key_start: int, cells: torch.Tensor, grid: Size, image_size: Optional[Size], **extra: Any) -> ImageLayout:
    return ImageLayout(int(key_start), int(cells.shape[0]), (int(grid[0]), int(grid[1])), cells,
                       None if image_size is None else (int(image_size[0]), int(image_size[1])), dict(extra))
