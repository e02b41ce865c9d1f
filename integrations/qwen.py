"""Qwen family: ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

Image tokens: the processor turns ``<|vision_start|><|image_pad|><|vision_end|>`` into a
run of ``t·h·w / m²`` ``<|image_pad|>`` tokens per image, where ``(t, h, w) =
image_grid_thw[i]`` counts ``patch × patch`` patches and ``m = spatial_merge_size`` (2):
the merger fuses 2×2 patches, so the run is the row-major ``(h/m, w/m)`` grid. The model
overwrites those embeddings in place, so positions in ``input_ids`` are key positions.
``mm_token_type_ids`` (5.x processors) and M-RoPE positions pass through untouched:
attention sees keys after RoPE.

Geometry: ``smart_resize`` scales each axis of the ``(w, h)`` image to
``(w·patch, h·patch)``-pixel multiples of ``patch·m``; a merged token covers
``patch·m`` resized pixels, i.e. ``w/(w_grid/m)`` original pixels across.
"""
from __future__ import annotations

import torch

from .base import Shim, call_ids, find_decoder, layout, prefill_ids, runs, size_pairs, squash_cells


class QwenShim(Shim):
    family = "qwen"
    variable_tokens = True
    pixel_keys = ("pixel_values", "mm_encoder_outputs", "image_embeds")
    CLASSES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen2VLModel",
               "Qwen2_5_VLModel")

    def __init__(self, model, processor=None):
        super().__init__(model, processor)
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        vc = cfg.vision_config
        self.patch = int(vc.patch_size)
        self.merge = int(getattr(vc, "spatial_merge_size", 2))

    def decoder(self):
        return find_decoder(self.model)

    def suffix_positions(self, cached: int, k: int, B: int, device):
        """M-RoPE continues after the image from the positions the prompt left: text token
        ``i`` after ``cached`` columns sits at ``cached + i + rope_delta`` on all three axes
        (the rule ``generate`` applies to new tokens)."""
        deltas = getattr(getattr(self.model, "model", None), "rope_deltas", None)
        if deltas is None:
            raise ValueError("qwen: the prompt call left no rope_deltas; cannot continue from its cache")
        pos = torch.arange(cached, cached + k, device=device)[None, :] + deltas.to(device).reshape(-1, 1)
        return pos[None].expand(3, B, k)

    def observe(self, args, kwargs):
        rec = {"input_ids": call_ids(args, kwargs), "has_pixels": self.has_pixels(args, kwargs)}
        thw = kwargs.get("image_grid_thw")
        if thw is not None:
            rec["image_grid_thw"] = thw
        return rec

    def spans(self, record, mask, image_sizes):
        ids = prefill_ids(record, mask, "qwen", f"<|image_pad|>, id {self.image_token_id}")
        thw = record.get("image_grid_thw")
        per_sample = []
        for b in range(ids.shape[0]):
            per_sample.append(runs(ids[b], self.image_token_id))
        n_images = sum(len(f) for f in per_sample)
        if n_images and thw is None:
            raise ValueError("qwen: found <|image_pad|> tokens but the call had no image_grid_thw")
        thw = [] if thw is None else torch.as_tensor(thw).reshape(-1, 3).tolist()
        if len(thw) != n_images:
            raise ValueError(
                f"qwen: found {n_images} runs of <|image_pad|> (id {self.image_token_id}) in input_ids but "
                f"image_grid_thw has {len(thw)} rows"
            )
        sizes = size_pairs(image_sizes, n_images, "qwen")
        out, i = [], 0
        m2 = self.merge * self.merge
        for b, found in enumerate(per_sample):
            lays = []
            for s, n in found:
                t, h, w = (int(v) for v in thw[i])
                if t * h * w // m2 != n:
                    raise ValueError(
                        f"qwen: sample {b} has a run of {n} <|image_pad|> tokens at {s}, but image_grid_thw[{i}] = "
                        f"{[t, h, w]} gives {t * h * w // m2}"
                    )
                if t != 1:
                    raise ValueError(f"qwen: image {i} has {t} temporal patches in image_grid_thw; expected 1 for an image")
                grid = (h // self.merge, w // self.merge)
                size = sizes[i] if sizes is not None else None
                cells = squash_cells(grid, size, (w * self.patch, h * self.patch))
                lays.append(layout(s, cells, grid, size, family="qwen"))
                i += 1
            out.append(lays)
        return out
