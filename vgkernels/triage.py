"""VGRefine step I, attention triage (SPEC §4)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._validate import check_heads
from .presets import resolve_heads


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
    pairs = check_heads(resolve_heads(heads), L, H)
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
