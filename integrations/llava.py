"""LLaVA family: ``LlavaForConditionalGeneration`` (LLaVA-1.5, LLaVA-Med-HF) and
``LlavaNextForConditionalGeneration``.

Image tokens: the processor expands ``<image>`` into ``N`` copies of
``config.image_token_index`` and the model overwrites their embeddings in place, so the
span positions in ``input_ids`` are the key positions inside the LLM.

- LLaVA-1.5: ``N = g²`` with ``g = vision image_size / patch`` (``+1`` for a CLS token
  first when ``vision_feature_select_strategy == "full"``), row-major. Geometry: HF's
  CLIP transform, shortest side to ``shortest_edge`` then a centre crop.
- LLaVA-NeXT: the base image squashed to ``g × g``, then the anyres tiles: the image is
  resized to fit the best pinpoint resolution (keeping its aspect) and padded, centred;
  the ``(rows·g, cols·g)`` feature grid loses its padding rows or columns
  (``unpad_image``) and each remaining feature row ends in a newline token (NaN cell).
  ``image_sizes`` ``(height, width)`` are a forward argument, so cells are always in
  original-image pixels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import Shim, Size, call_ids, cls_row, find_decoder, layout, prefill_ids, resize_crop_cells, runs, size_pairs, squash_cells
from vgkernels.layout import grid_cells


class LlavaShim(Shim):
    family = "llava"
    CLASSES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "LlavaModel", "LlavaNextModel")

    def __init__(self, model, processor=None):
        super().__init__(model, processor)
        cfg = model.config
        self.next = cfg.model_type == "llava_next" or "LlavaNext" in type(model).__name__
        self.variable_tokens = self.next
        self.image_token_id = int(getattr(cfg, "image_token_index", getattr(cfg, "image_token_id", -1)))
        vc = cfg.vision_config
        self.tile = int(vc.image_size)
        self.patch = int(vc.patch_size)
        self.g = self.tile // self.patch
        self.strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        ip = getattr(processor, "image_processor", None)
        se = getattr(ip, "size", None) or {}
        cs = getattr(ip, "crop_size", None) or {}
        self.shortest_edge = int(_get(se, "shortest_edge", self.tile))
        self.crop = (int(_get(cs, "width", self.tile)), int(_get(cs, "height", self.tile)))
        self.pinpoints = getattr(cfg, "image_grid_pinpoints", None)

    def decoder(self):
        return find_decoder(self.model)

    def observe(self, args, kwargs):
        ids = call_ids(args, kwargs)
        rec = {"input_ids": ids, "has_pixels": self.has_pixels(args, kwargs)}
        if ids is None:
            return rec
        sizes = kwargs.get("image_sizes")
        if sizes is not None:
            rec["image_sizes"] = sizes
        return rec

    def spans(self, record, mask, image_sizes):
        ids = prefill_ids(record, mask, self.family, f"id {self.image_token_id}")
        per_sample = []
        for b in range(ids.shape[0]):
            # the model places image features at every image token, whatever the mask says
            found = runs(ids[b], self.image_token_id)
            if not self.next:
                n1 = self.g * self.g + (1 if self.strategy == "full" else 0)
                split = []
                for s, n in found:
                    if n % n1:
                        raise ValueError(
                            f"llava: sample {b} has a run of {n} image tokens (id {self.image_token_id}) at {s}; "
                            f"expected a multiple of {n1} (a {self.g}x{self.g} grid per image)"
                        )
                    split += [(s + i * n1, n1) for i in range(n // n1)]
                found = split
            per_sample.append(found)
        n_images = sum(len(f) for f in per_sample)
        nxt_sizes = record.get("image_sizes")
        sizes = size_pairs(image_sizes, n_images, "llava")
        if sizes is None and nxt_sizes is not None:
            hw = torch.as_tensor(nxt_sizes).reshape(-1, 2).tolist()
            sizes = [(int(w), int(h)) for h, w in hw]
        out, i = [], 0
        for b, found in enumerate(per_sample):
            lays = []
            for s, n in found:
                size = sizes[i] if sizes is not None else None
                lays.append(self._next_layout(s, n, size, b) if self.next else self._layout(s, n, size))
                i += 1
            out.append(lays)
        return out

    def _layout(self, start: int, n: int, size: Optional[Size]):
        grid = (self.g, self.g)
        cells = resize_crop_cells(grid, size, self.shortest_edge, self.crop)
        if n == self.g * self.g + 1:
            cells = cls_row(cells)
        return layout(start, cells, grid, size, family="llava")

    def _next_layout(self, start: int, n: int, size: Optional[Size], b: int):
        if size is None:
            raise ValueError("llava-next: image_sizes are needed for the tile layout and were not given")
        cells, tiles = next_cells(size, self.pinpoints, self.tile, self.patch)
        if cells.shape[0] != n:
            raise ValueError(
                f"llava-next: sample {b} has {n} image tokens at {start}, but an image of {size[0]}x{size[1]} "
                f"with pinpoints {self.pinpoints} gives {cells.shape[0]} (base {self.g}x{self.g} + tiles {tiles})"
            )
        return layout(start, cells, (self.g, self.g), size, family="llava-next", tiles_grid=tiles)


def _get(d, key, default):
    if isinstance(d, dict):
        return d.get(key) or default
    return getattr(d, key, None) or default


def next_cells(size: Size, pinpoints, tile: int, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """LLaVA-NeXT cells of an image of ``size = (width, height)``.

    Returns ``(cells (N, 4), (rows, cols))``: the ``g × g`` base grid over the whole image
    (the base image is squashed to a square), then for each kept feature row its kept
    columns and a NaN newline cell; ``(rows, cols)`` is the unpadded feature grid.
    """
    from transformers.image_processing_utils import select_best_resolution

    w, h = size
    g = tile // patch
    base = squash_cells((g, g), size, (tile, tile))
    bh, bw = select_best_resolution((h, w), pinpoints)
    Hf, Wf = (bh // tile) * g, (bw // tile) * g
    # unpad_image, in feature units (as the model does it)
    if w / h > Wf / Hf:
        new_h = int(round(h * (Wf / w), 7))
        pad = (Hf - new_h) // 2
        rows, cols = range(pad, Hf - pad), range(Wf)
    else:
        new_w = int(round(w * (Hf / h), 7))
        pad = (Wf - new_w) // 2
        rows, cols = range(Hf), range(pad, Wf - pad)
    # the processor's resize-to-fit (get_patch_output_size) and centred pad, in pixels
    sx, sy = bw / w, bh / h
    if sx < sy:
        rw, rh = bw, min(math.ceil(h * sx), bh)
    else:
        rw, rh = min(math.ceil(w * sy), bw), bh
    px, py = (bw - rw) // 2, (bh - rh) // 2
    full = grid_cells((Hf, Wf), (0.0, 0.0, float(bw), float(bh))).reshape(Hf, Wf, 4)
    nan = torch.full((1, 4), float("nan"), dtype=torch.float64)
    parts = [base]
    for r in rows:
        c = full[r, cols[0]: cols[-1] + 1].clone()
        c[:, 0::2] = (c[:, 0::2] - px) * (w / rw)
        c[:, 1::2] = (c[:, 1::2] - py) * (h / rh)
        parts += [c, nan]
    return torch.cat(parts, dim=0), (len(rows), len(cols))
