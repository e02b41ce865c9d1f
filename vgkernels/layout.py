"""Where each image token sits, in original-image pixels (SPEC §6), and box masks.

An :class:`ImageLayout` describes one image inside one sample's sequence: the key
position of its first token, its token count ``N``, the main grid ``(gh, gw)`` and
``cells (N, 4)``, each token's box ``(x0, y0, x1, y1)`` in the pixels of the image as
the user loaded it. A row of NaN marks a token with no place (a newline token). Family
shims build layouts that undo their processor's resize, crop or padding; the mask of a
ground-truth box is then the same computation for every family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from .constants import OFFICIAL_GRID


@dataclass
class ImageLayout:
    """One image's tokens. ``cells (N, 4)`` float64, ``(x0, y0, x1, y1)`` per token."""

    key_start: int
    N: int
    grid: tuple[int, int]
    cells: torch.Tensor
    image_size: Optional[tuple[int, int]] = None  # (width, height) of the original image
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.cells.shape != (self.N, 4):
            raise ValueError(f"cells: expected shape ({self.N}, 4), got {tuple(self.cells.shape)}")


def grid_cells(grid: tuple[int, int], box: Sequence[float]) -> torch.Tensor:
    """Row-major cells ``(gh·gw, 4)`` of a ``(gh, gw)`` grid tiling ``box = (x0, y0, x1, y1)``."""
    gh, gw = int(grid[0]), int(grid[1])
    x0, y0, x1, y1 = (float(c) for c in box)
    xs = torch.linspace(x0, x1, gw + 1, dtype=torch.float64)
    ys = torch.linspace(y0, y1, gh + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    return torch.stack([xs[xx], ys[yy], xs[xx + 1], ys[yy + 1]], dim=1)


def grid_layout(grid: tuple[int, int], image_size: tuple[int, int], key_start: int = 0) -> ImageLayout:
    """A row-major ``(gh, gw)`` grid covering the whole ``image_size = (width, height)``."""
    w, h = image_size
    cells = grid_cells(grid, (0.0, 0.0, float(w), float(h)))
    return ImageLayout(int(key_start), cells.shape[0], (int(grid[0]), int(grid[1])), cells, (int(w), int(h)))


def _boxes_tensor(boxes) -> torch.Tensor:
    try:
        t = torch.as_tensor(boxes, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"boxes: expected [x, y, w, h] or a list of them, got {boxes!r} ({e})") from None
    if t.numel() == 0:
        return t.reshape(0, 4)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] != 4:
        raise ValueError(f"boxes: expected [x, y, w, h] or a list of them, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"boxes: expected finite numbers, got {t.tolist()}")
    if bool((t[:, 2:] < 0).any()):
        raise ValueError(f"boxes: widths and heights must be >= 0, got {t.tolist()}")
    return t


def _check_inside(layout: ImageLayout, b: torch.Tensor) -> None:
    """A box with no area in common with the image is an error (a wrong box or a wrong
    image), when the layout knows the image's size. A box that sticks out of the image
    is fine: the part inside counts."""
    if layout.image_size is None:
        return
    w, h = (float(v) for v in layout.image_size)
    x0, y0 = b[:, 0], b[:, 1]
    x1, y1 = x0 + b[:, 2], y0 + b[:, 3]
    outside = (x1 <= 0) | (y1 <= 0) | (x0 >= w) | (y0 >= h)
    if bool(outside.any()):
        bad = [[round(float(c), 3) for c in row] for row in b[outside].tolist()]
        raise ValueError(f"boxes: {bad} ([x, y, w, h]) lie entirely outside the image of "
                         f"{int(w)}x{int(h)} pixels (width x height)")


def _one_mask(layout: ImageLayout, boxes) -> torch.Tensor:
    b = _boxes_tensor(boxes)
    _check_inside(layout, b)
    cells = layout.cells
    if b.shape[0] == 0:
        return torch.zeros(layout.N, dtype=torch.bool)
    bx0, by0 = b[:, 0], b[:, 1]
    bx1, by1 = bx0 + b[:, 2], by0 + b[:, 3]
    # "Any overlap" means an intersection of positive area; a box edge that only
    # touches a cell border does not select that cell. NaN cells compare False.
    ox = (cells[:, None, 0] < bx1[None]) & (cells[:, None, 2] > bx0[None])
    oy = (cells[:, None, 1] < by1[None]) & (cells[:, None, 3] > by0[None])
    return (ox & oy).any(dim=1)


def box_mask(
    layout: Union[ImageLayout, Sequence[ImageLayout]],
    boxes,
) -> torch.Tensor:
    """Token mask of the cells overlapping any of ``boxes`` (``[x, y, w, h]`` in pixels).

    With one :class:`ImageLayout` and a list of boxes: ``(N,)`` bool. With a sequence of
    layouts (``vg.layout``) and one box list per sample: ``(B, max N)`` bool, False past
    each sample's ``N``.

    Raises ``ValueError`` for a box with a NaN or infinite coordinate, a negative width
    or height, or (when the layout knows ``image_size``) no area inside the image. A box
    inside the image that no token covers (cut away by a centre crop) gives an empty
    mask: :func:`visible_region` tells what the tokens cover.
    """
    if isinstance(layout, ImageLayout):
        return _one_mask(layout, boxes)
    layouts = list(layout)
    boxes = list(boxes)
    if len(boxes) != len(layouts):
        raise ValueError(f"boxes: expected one box list per layout ({len(layouts)}), got {len(boxes)}")
    n = max((lay.N for lay in layouts), default=0)
    out = torch.zeros(len(layouts), n, dtype=torch.bool)
    for i, (lay, bx) in enumerate(zip(layouts, boxes)):
        out[i, : lay.N] = _one_mask(lay, bx)
    return out


def visible_region(layout: ImageLayout):
    """``(x0, y0, x1, y1)``: the bounding box, in original-image pixels, of the cells of
    the tokens that have a place (what the model sees of the image), or None."""
    c = layout.cells
    ok = torch.isfinite(c).all(dim=1)
    if not bool(ok.any()):
        return None
    c = c[ok]
    return (float(c[:, 0].min()), float(c[:, 1].min()), float(c[:, 2].max()), float(c[:, 3].max()))


def gt_tokens_mask(gt_tokens: Sequence[Sequence[int]], grid: tuple[int, int] = OFFICIAL_GRID) -> torch.Tensor:
    """``(gh·gw,)`` bool mask from the authors' ``gt_tokens`` cells ``[x, y]``:
    cell ``[x, y]`` is token ``y · gw + x`` (row-major)."""
    gh, gw = int(grid[0]), int(grid[1])
    m = torch.zeros(gh * gw, dtype=torch.bool)
    for cell in gt_tokens:
        if len(cell) != 2:
            raise ValueError(f"gt_tokens: expected [x, y] pairs, got {cell!r}")
        x, y = int(cell[0]), int(cell[1])
        if not (0 <= x < gw and 0 <= y < gh):
            raise ValueError(f"gt_tokens: cell [x={x}, y={y}] lies outside the {gh}x{gw} grid")
        m[y * gw + x] = True
    return m
