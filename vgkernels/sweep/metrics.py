"""From captured maps to the sweep's metrics (SPEC §3).

For one sample with question maps ``α (L, H, N)``, reference-prompt maps ``ρ (L, H, N)``
and ground-truth token mask ``m (N,)``:

- per layer (Fig. 3): ``A^ℓ = mean_h α^{ℓ,h}``; metrics of ``A^ℓ`` against ``m``, and of
  ``A^ℓ / R^ℓ`` with ``R^ℓ = mean_h ρ^{ℓ,h}`` (the paper's reference normalisation);
- per head (Fig. D.1): metrics of ``α^{ℓ,h}``, and of ``α^{ℓ,h} / R^ℓ`` — each head is
  divided by its layer's **head-mean** reference, the same division VGRefine's triage
  applies to the heads it aggregates (SPEC §4), so a head ranked on ``kl_ref`` is ranked
  on exactly the quantity triage uses. (A head's own reference map would be noisier:
  single heads often put near-zero mass on most tokens, and the ratio then explodes.)

Reference probabilities that underflowed to 0 are floored at the smallest normal
float32 so that the division stays finite.
"""
from __future__ import annotations

import numpy as np
import torch

from ..layout import ImageLayout, box_mask, gt_tokens_mask, visible_region

from ..constants import OFFICIAL_GRID
MASK_MODES = ("auto", "bbox", "gt_tokens")
_TINY = float(torch.finfo(torch.float32).tiny)


def sample_mask(sample, layout: ImageLayout, mode: str = "auto"):
    """Ground-truth token mask ``(N,)`` bool of one sample, and which source made it.

    ``auto``: the authors' ``gt_tokens`` when the sample has them and the model's image
    is exactly the 24×24 grid they were made for (``grid == (24, 24)`` and ``N == 576``);
    otherwise the boxes through ``box_mask`` on the model's own token cells.

    A mask that selects no token cannot be scored (every metric would be NaN): it raises
    :class:`~.datasets.SampleError` saying why (a box outside the image, a box that the
    processor's crop cut away, no gt_tokens), as do boxes ``box_mask`` refuses, so the
    sweep rejects the sample instead of storing empty metrics.
    """
    from .datasets import SampleError

    if mode not in MASK_MODES:
        raise ValueError(f"mask: expected one of {MASK_MODES}, got {mode!r}")
    fits = tuple(layout.grid) == OFFICIAL_GRID and layout.N == OFFICIAL_GRID[0] * OFFICIAL_GRID[1]
    if mode == "gt_tokens" or (mode == "auto" and sample.gt_tokens is not None and fits):
        if sample.gt_tokens is None:
            raise SampleError(f"sample {sample.sid}: --mask gt_tokens but the row has no gt_tokens", "empty mask")
        if not fits:
            raise ValueError(f"sample {sample.sid}: gt_tokens are 24x24 cells but the model's image has "
                             f"grid {tuple(layout.grid)} with N={layout.N}; use --mask bbox")
        mask = gt_tokens_mask(sample.gt_tokens, OFFICIAL_GRID)
        if not bool(mask.any()):
            raise SampleError(f"sample {sample.sid}: gt_tokens is empty", "empty mask")
        return mask, "gt_tokens"
    try:
        mask = box_mask(layout, sample.boxes)
    except ValueError as e:
        kind = "box outside the image" if "outside the image" in str(e) else "bad box"
        raise SampleError(f"sample {sample.sid}: {e}", kind) from None
    if not bool(mask.any()):
        seen = visible_region(layout)
        where = ("no token of the image has a place" if seen is None else
                 f"its image tokens cover x {seen[0]:.1f}..{seen[2]:.1f}, y {seen[1]:.1f}..{seen[3]:.1f}")
        size = "" if layout.image_size is None else f" of the {layout.image_size[0]}x{layout.image_size[1]} image"
        raise SampleError(f"sample {sample.sid}: boxes {sample.boxes} ([x, y, w, h]) lie entirely outside what the "
                          f"model sees: {where}{size} (the processor resized or cropped away the rest)",
                          "box outside what the model sees")
    return mask, "bbox"


def cpu_safe_backend(backend: str, device) -> str:
    """``"auto"`` means the plain PyTorch backend on CPU: under ``TRITON_INTERPRET=1``
    (set by the test suite) "auto" would pick the Triton interpreter, which is for
    checking kernels, not for running sweeps."""
    if backend == "auto" and torch.device(device).type == "cpu":
        return "torch"
    return backend


def sample_metrics(maps_q: torch.Tensor, maps_ref: torch.Tensor, mask: torch.Tensor, *, backend="auto"):
    """``head (6, L, H)`` and ``layer (6, L)`` float32 numpy arrays, rows in
    :data:`vgkernels.sweep.store.METRICS` order (ar, kl, js, ar_ref, kl_ref, js_ref).

    ``maps_q``, ``maps_ref``: ``(L, H, N)`` float32, already cut to the sample's ``N``.
    """
    from .. import grounding_metrics

    if maps_q.shape != maps_ref.shape or maps_q.dim() != 3:
        raise ValueError(f"maps: expected matching (L, H, N) question and reference maps, got "
                         f"{tuple(maps_q.shape)} and {tuple(maps_ref.shape)}")
    if mask.shape != maps_q.shape[-1:]:
        raise ValueError(f"mask: expected shape ({maps_q.shape[-1]},), got {tuple(mask.shape)}")
    q = maps_q.float()
    mask = mask.to(q.device)
    backend = cpu_safe_backend(backend, q.device)
    ref_layer = maps_ref.float().mean(dim=1).clamp_min(_TINY)  # (L, N)
    lay_q = q.mean(dim=1)  # (L, N)
    h = grounding_metrics(q, mask, backend=backend)
    hr = grounding_metrics(q, mask, reference=ref_layer[:, None, :], backend=backend)
    l_ = grounding_metrics(lay_q, mask, backend=backend)
    lr = grounding_metrics(lay_q, mask, reference=ref_layer, backend=backend)
    head = torch.stack([h.ar, h.kl, h.js, hr.ar, hr.kl, hr.js]).cpu().numpy().astype(np.float32)
    layer = torch.stack([l_.ar, l_.kl, l_.js, lr.ar, lr.kl, lr.js]).cpu().numpy().astype(np.float32)
    return head, layer


def authors_cells(sample, layout: ImageLayout, mask_kind: str):
    """The ``[x, y]`` cells the authors' metrics score a sample against, or None when the
    layout is not one full row-major grid (a CLS or newline token, tiles).

    ``mask_kind == "gt_tokens"``: the authors' own ``gt_tokens`` (repeats kept). Boxes:
    the cells each box covers, box after box, so a cell under two boxes is listed twice,
    as the authors' per-box covering lists do."""
    gh, gw = (int(g) for g in layout.grid)
    if layout.N != gh * gw:
        return None
    if mask_kind == "gt_tokens":
        return [list(c) for c in sample.gt_tokens]
    cells = []
    for box in sample.boxes:
        for t in torch.nonzero(box_mask(layout, [box])).flatten().tolist():
            cells.append([t % gw, t // gw])
    return cells


def authors_layer_metrics(maps_q: torch.Tensor, maps_ref: torch.Tensor, cells, grid) -> np.ndarray:
    """``(6, L)`` float32 in :data:`vgkernels.sweep.store.METRICS` order by the authors'
    conventions (:func:`vgkernels.paper.authors_metrics`) on the head-mean maps: the
    question maps, then the question maps divided elementwise by the reference prompt's
    (floored at the smallest normal float32, as :func:`sample_metrics`). NaN when
    ``cells`` is None or empty."""
    from ..paper import authors_metrics

    L = maps_q.shape[0]
    if not cells:
        return np.full((6, L), np.nan, np.float32)
    q = maps_q.double().mean(dim=1).cpu()
    ref = maps_ref.double().mean(dim=1).clamp_min(_TINY).cpu()
    a = authors_metrics(q, cells, grid=grid)
    r = authors_metrics(q / ref, cells, grid=grid)
    return torch.stack([a.ar, a.kl, a.js, r.ar, r.kl, r.js]).numpy().astype(np.float32)
