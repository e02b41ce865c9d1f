"""VGRefine presets: top-K grounding heads and knockout layers per model.

``HEADS["huatuogpt-vision-7b"]`` is the authors' list, ranked by lowest KL on their
COCO evaluation set (natural images, so no medical benchmark leaks into the choice).
For another model derive a list with ``vgkernels heads --sweep DIR --top-k 20``, which
writes a ``heads.json`` that every function taking ``heads`` accepts.
"""
from __future__ import annotations

import json
import os
from typing import Sequence, Union

HEADS: dict[str, list[tuple[int, int]]] = {
    "huatuogpt-vision-7b": [
        (15, 4), (16, 5), (15, 1), (10, 6), (4, 0), (15, 24), (19, 6), (8, 3), (19, 18), (18, 10),
        (4, 17), (16, 2), (16, 17), (16, 1), (14, 23), (6, 18), (18, 19), (6, 11), (0, 2), (17, 26),
    ],
}

# Knockout layers: the paper uses layer 16 for its 7B models and 34, 35, 36 for the
# 34B model (Supp. of the paper), with K = 20 and p = 50 in both cases.
LAYERS: dict[str, list[int]] = {
    "huatuogpt-vision-7b": [16],
    "huatuogpt-vision-34b": [34, 35, 36],
}

DEFAULT_TOP_K = 20
DEFAULT_PERCENTILE = 50.0


def resolve_heads(heads: Union[str, os.PathLike, Sequence[Sequence[int]]]) -> list[tuple[int, int]]:
    """``heads`` as ``(layer, head)`` pairs: a preset name, a ``heads.json`` path, or pairs.

    A ``heads.json`` is either a list of pairs or an object with a ``"heads"`` list
    whose items are pairs or ``{"layer": l, "head": h}`` records.
    """
    if isinstance(heads, (str, os.PathLike)):
        key = os.fspath(heads)
        if key in HEADS:
            return list(HEADS[key])
        if not os.path.exists(key):
            raise ValueError(f"heads: {key!r} is neither a preset ({sorted(HEADS)}) nor an existing heads.json file")
        with open(key) as f:
            data = json.load(f)
        items = data["heads"] if isinstance(data, dict) else data
        out = []
        for it in items:
            out.append((int(it["layer"]), int(it["head"])) if isinstance(it, dict) else (int(it[0]), int(it[1])))
        return out
    return [(int(l), int(h)) for l, h in heads]
