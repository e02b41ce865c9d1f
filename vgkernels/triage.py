"""VGRefine step I, attention triage (SPEC §4)."""
from __future__ import annotations

import numbers
import os
from typing import Optional, Sequence, Union

import torch

from ._validate import check_heads
from .presets import resolve_heads


def _head_pairs(heads):
    """``heads`` unchanged when it is a name, a path or a sequence of ``(layer, head)``
    pairs; ``ValueError`` for a bare pair such as ``(0, 1)`` (which reads as two heads
    that are not pairs) or for items that are not pairs."""
    if isinstance(heads, (str, os.PathLike)):
        return heads
    if isinstance(heads, torch.Tensor) and not (heads.dim() == 1 and heads.numel() == 2):
        if heads.dim() != 2 or heads.shape[-1] != 2:
            raise ValueError(f"heads: expected a (K, 2) tensor of (layer, head) pairs, got shape {tuple(heads.shape)}")
        return heads.tolist()
    try:
        items = list(heads)
    except TypeError:
        raise ValueError(f"heads: expected a preset name, a heads.json path or a list of (layer, head) pairs, "
                         f"got {heads!r}") from None
    if len(items) == 2 and all(_is_int(x) for x in items):
        raise ValueError(f"heads: got a bare pair {tuple(int(x) for x in items)}; expected a list of (layer, head) "
                         f"pairs, e.g. [({int(items[0])}, {int(items[1])})]")
    bad = [it for it in items if isinstance(it, (str, bytes)) or _is_int(it) or not _is_pair(it)]
    if bad:
        raise ValueError(f"heads: expected (layer, head) pairs, got {bad[0]!r} among {heads!r}")
    return items


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) or (isinstance(x, torch.Tensor) and x.dim() == 0
                                               and not x.is_floating_point())


def _is_pair(x) -> bool:
    try:
        return len(x) == 2 and all(_is_int(v) for v in x)
    except TypeError:
        return False


def triage_scores(
    maps: torch.Tensor,
    heads: Union[str, Sequence[Sequence[int]]],
    *,
    reference: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``agg[b] = mean_k maps[b, l_k, h_k] / reference[b, l_k]`` as float64 ``(B, N)``.

    ``maps (B, L, H, N)``; ``reference (B, L, N)`` head-mean reference-prompt maps, or
    ``(B, L, H, N)``, which is head-averaged first.
    """
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4:
        got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"maps: expected shape (B, L, H, N), got {got}")
    B, L, H, N = maps.shape
    pairs = check_heads(resolve_heads(_head_pairs(heads)), L, H)
    li = torch.tensor([p[0] for p in pairs], device=maps.device)
    hi = torch.tensor([p[1] for p in pairs], device=maps.device)
    sel = maps.to(torch.float64)[:, li, hi]  # (B, K, N)
    if reference is not None:
        ref = reference.to(device=maps.device, dtype=torch.float64)
        if ref.dim() == 4:
            if ref.shape[:2] != (B, L) or ref.shape[-1] != N:
                raise ValueError(f"reference: expected shape ({B}, {L}, H, {N}) or ({B}, {L}, {N}), "
                                 f"got {tuple(ref.shape)}")
            ref = ref.mean(dim=2)
        if tuple(ref.shape) != (B, L, N):
            raise ValueError(f"reference: expected shape ({B}, {L}, {N}) or ({B}, {L}, H, {N}), "
                             f"got {tuple(ref.shape)}")
        sel = sel / ref[:, li]
    return sel.mean(dim=1)


def triage_mask(
    maps: torch.Tensor,
    heads: Union[str, Sequence[Sequence[int]]],
    *,
    reference: Optional[torch.Tensor] = None,
    percentile: float = 50.0,
) -> torch.Tensor:
    """Keep mask ``(B, N)`` bool: ``keep[b, j] = agg[b, j] >= percentile_p(agg[b])``.

    ``agg`` is :func:`triage_scores`; the threshold is ``numpy.percentile`` with linear
    interpolation, taken per sample over its non-NaN tokens (a batch of images with
    different ``N`` pads ``maps`` with NaN, and those padded tokens get ``False``).
    ``heads`` is a list of ``(layer, head)`` pairs, a preset name from
    :mod:`vgkernels.presets`, or the path of a ``heads.json``.
    """
    p = float(percentile)
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile: expected a value in [0, 100], got {percentile!r}")
    agg = triage_scores(maps, heads, reference=reference)
    if agg.shape[-1] == 0:
        return torch.zeros(agg.shape, dtype=torch.bool, device=agg.device)
    thr = torch.nanquantile(agg, p / 100.0, dim=-1, keepdim=True, interpolation="linear")
    return agg >= thr
