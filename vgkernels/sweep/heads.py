"""``vgkernels heads``: rank attention heads by grounding, for VGRefine's triage.

Each ``(layer, head)`` is scored by its mean KL over the sweep's samples (lowest = best
aligned with the boxes; NaN rows, e.g. an empty mask, are left out of the mean) and the
``--top-k`` best are written to ``heads.json``:

.. code-block:: json

    {"heads": [{"layer": 15, "head": 4, "score": 1.93, "n": 1388}, ...],
     "metric": "kl_ref", "top_k": 20, "model": "...", "model_type": "llava", "family": "llava",
     "num_layers": 32, "num_heads": 32, "hidden_size": 4096, "sweep": "...", "where": {}}

(the model fields let ``vgkernels refine`` refuse heads ranked on another model; a head
with no finite score has ``"score": null``)

which :func:`vgkernels.presets.resolve_heads` — hence ``triage_mask`` and ``VGRefine`` —
accepts as a path.

The default metric is ``kl_ref``, KL of the reference-normalised maps: the paper ranks
heads "following the same evaluation setup" as its layer analysis (Sec. 2.3, which
divides by the reference prompt's map), and triage divides the selected heads' maps by
the same head-mean reference (SPEC §4). ``--metric kl`` ranks the raw maps.

Why rank on natural images: the paper selects its heads on randomly sampled **COCO**
images (Supp. D), not on the medical benchmarks, so that the choice of heads does not
leak evaluation data into the method; it then shows that heads that ground well on
natural images are also the relatively better ones on medical images (Fig. D.1). Run
the ranking sweep on COCO (``--format coco`` on an ``instances_*.json``, or the
authors' ``COCO_*_questions.jsonl``) and evaluate VGRefine on the medical sets.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..clitools import RunError, UsageError, at_least
from .store import METRICS, load_results


def add_arguments(p):
    p.epilog = ("Rank on a sweep over natural images (COCO), as the paper does: the heads are then chosen "
                "without looking at the medical evaluation data, and the paper shows that heads which ground "
                "well on natural images are also the relatively better ones on medical images (Fig. D.1).")
    p.add_argument("--sweep", required=True, help="the --out directory of a finished sweep")
    p.add_argument("--top-k", type=at_least(1), default=20, help="how many heads to keep (default 20, the paper's K)")
    p.add_argument("--metric", default="kl_ref", choices=["kl_ref", "kl", "js_ref", "js"],
                   help="score to rank by, lowest first (default kl_ref: reference-normalised KL)")
    p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                   help="use only samples whose carried field equals VALUE (repeatable)")
    p.add_argument("--out", default=None, help="output path (default SWEEP/heads.json)")


def _parse_where(items) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--where: expected FIELD=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def rank_heads(head: np.ndarray, metric: str = "kl_ref", top_k: int = 20, layers=None):
    """``[(layer, head, score, n)]`` for the ``top_k`` lowest mean scores.

    ``head (n, 6, L, H)`` as stored by the sweep; ``layers`` names the decoder layer of
    each of the ``L`` rows (the sweep's ``--layers``; default ``0..L-1``). Ties are
    broken by (layer, head) so the ranking is deterministic; heads with no finite value
    rank last.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if head.ndim != 4 or head.shape[1] != len(METRICS):
        raise ValueError(f"head metrics: expected shape (n, {len(METRICS)}, L, H), got {head.shape}")
    if top_k < 1:
        raise ValueError(f"top_k: expected >= 1, got {top_k}")
    vals = head[:, METRICS.index(metric)].astype(np.float64)  # (n, L, H)
    finite = np.isfinite(vals)
    n = finite.sum(axis=0)
    if not n.any():
        raise RunError(f"no sample has a finite {metric}: the sweep holds {head.shape[0]} scored samples "
                       "(every sample was rejected, or every mask was empty; see the sweep's rejects.jsonl); "
                       "there is nothing to rank")
    mean = np.where(n > 0, np.where(finite, vals, 0.0).sum(axis=0) / np.maximum(n, 1), np.inf)
    L, H = mean.shape
    names = list(range(L)) if layers is None else [int(l) for l in layers]
    if len(names) != L:
        raise ValueError(f"layers: expected {L} layer indices, got {len(names)}")
    order = sorted(((mean[l, h], names[l], h, l) for l in range(L) for h in range(H)))
    return [(name, h, float(s), int(n[l, h])) for s, name, h, l in order[:top_k]]


# What a heads.json says about the model it was ranked on; VGRefine checks it against the
# model it is given (vgkernels.refine.cli.check_heads_file).
MODEL_KEYS = ("model", "model_type", "family", "num_layers", "num_heads", "hidden_size")


def _is_heads_file(path: str) -> bool:
    """Whether ``path`` is a ranking this command wrote (so re-ranking may replace it)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and {"heads", "metric", "sweep"} <= doc.keys()


def run(args) -> int:
    from ..clitools import logger

    from ..outdir import OutputLock

    if not os.path.isdir(args.sweep):
        raise UsageError(f"--sweep: {args.sweep!r} is not a folder; expected the --out folder of a sweep")
    try:
        with OutputLock(args.sweep):  # not while a sweep is writing (merging) this folder
            meta, recs, head, _ = load_results(args.sweep)
        where = _parse_where(args.where)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if where:
        sel = np.array([all(str(r["fields"].get(k)) == v for k, v in where.items()) for r in recs], bool)
        if not sel.any():
            raise UsageError(f"--where {where}: no sample of {args.sweep!r} matches")
        head = head[sel]
    ranked = rank_heads(head, args.metric, args.top_k, meta.get("layers"))
    out = args.out or os.path.join(args.sweep, "heads.json")
    doc = {"heads": [{"layer": l, "head": h, "score": s if np.isfinite(s) else None, "n": n}
                     for l, h, s, n in ranked],
           "metric": args.metric, "top_k": args.top_k, **{k: meta.get(k) for k in MODEL_KEYS},
           "sweep": os.path.abspath(args.sweep), "where": where, "samples": int(head.shape[0])}
    if doc["num_heads"] is None:  # a sweep of an earlier version: its H is every head
        doc["num_heads"] = meta.get("H")
    if os.path.exists(out) and not _is_heads_file(out):
        raise UsageError(f"--out: {out!r} exists and is not a heads file written by `vgkernels heads`; it is left "
                         "as it is: choose another path")
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
    os.replace(tmp, out)
    logger.info(f"top {len(ranked)} heads by mean {args.metric} over {head.shape[0]} samples -> {out}")
    for i, (l, h, s, n) in enumerate(ranked):
        logger.info(f"  {i + 1:3d}. layer {l:3d} head {h:3d}  {args.metric} {s:.4f}  (n={n})")
    return 0
