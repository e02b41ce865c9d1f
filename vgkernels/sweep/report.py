"""Tables and plots of a merged sweep (``OUT/summary/``, ``OUT/plots/``).

Tables (CSV, one row per group × layer or group × layer × head; columns ``field, value,
layer[, head], n`` then the mean of each metric of :data:`~.store.METRICS` over the
samples with a finite value):

- ``summary/layers.csv`` — per layer (head-mean maps), overall (``field = "all"``) and
  broken down by every carried field with 2–20 distinct values (modality, label, …);
- ``summary/heads.csv`` — per layer and head, same breakdowns;
- ``summary/layers.txt`` — the overall per-layer table as printed by the sweep.

A sweep run with ``--profile authors`` shows the authors' metric conventions
(:mod:`vgkernels.paper`) in ``layers.csv``, ``layers.txt`` and the plots, and writes the
exact per-row metrics to ``summary/layers_exact.csv``; ``heads.csv`` is exact in both
profiles (the authors' per-layer normalisation has no per-head counterpart).

Plots (PNG, matplotlib's Agg backend):

- ``plots/layers.png`` — AR, KL, JS per layer, question maps (top) and
  reference-normalised maps (bottom), one curve per group of the first breakdown field
  (Fig. 3 of the paper);
- ``plots/heads_kl.png`` — layer × head mean KL, raw and reference-normalised
  (Fig. D.1);
- ``plots/overlays.png`` — for up to ``--overlays`` samples whose raw maps were kept:
  the image with its boxes, and the head-mean maps of the layer with the lowest mean
  KL/ref over the sweep for the question prompt, the reference prompt and their ratio
  painted over it (Fig. 1), in units of the map's mean (1 = uniform).
"""
from __future__ import annotations

import csv
import os
from collections import Counter

import numpy as np

from ..clitools import at_least
from ..data import ImageReadError, read_image
from .store import METRICS, load_results, read_maps


def breakdown_fields(recs, max_values: int = 20) -> list:
    """Carried fields worth grouping on: scalar values with 2..max_values distinct values."""
    counts: dict = {}
    for r in recs:
        for k, v in r["fields"].items():
            if k in ("image_id",) or not isinstance(v, (str, int, bool)):
                continue
            counts.setdefault(k, Counter())[v] += 1
    return sorted(k for k, c in counts.items() if 2 <= len(c) <= max_values)


def _nanmean(x, axis=0):
    finite = np.isfinite(x)
    n = finite.sum(axis=axis)
    s = np.where(finite, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan), n


def groups(recs, fields):
    """``[(field, value, row_indices)]`` starting with ``("all", "all", every row)``."""
    out = [("all", "all", np.arange(len(recs)))]
    for f in fields:
        vals = sorted({r["fields"].get(f) for r in recs if f in r["fields"]}, key=str)
        for v in vals:
            idx = np.array([i for i, r in enumerate(recs) if r["fields"].get(f) == v], dtype=np.int64)
            out.append((f, v, idx))
    return out


def layer_table(layer: np.ndarray):
    """Mean ``(6, L)`` and finite counts over samples of ``layer (n, 6, L)``."""
    return _nanmean(layer.astype(np.float64), axis=0)


def format_layer_table(mean: np.ndarray, n_samples: int, title: str = "", layers=None) -> str:
    L = mean.shape[1]
    names = list(range(L)) if layers is None else list(layers)
    head = f"{'layer':>5} | {'AR':>8} {'KL':>8} {'JS':>8} | {'AR/ref':>8} {'KL/ref':>8} {'JS/ref':>8}"
    lines = [title] if title else []
    lines += [f"per-layer grounding over {n_samples} samples (head-mean maps; /ref = divided by the "
              f"reference prompt's map)", head, "-" * len(head)]
    for l in range(L):
        v = mean[:, l]
        lines.append(f"{names[l]:5d} | {v[0]:8.3f} {v[1]:8.3f} {v[2]:8.3f} | {v[3]:8.3f} {v[4]:8.3f} {v[5]:8.3f}")
    if L and np.isfinite(mean[4]).any():
        best = int(np.nanargmin(mean[4]))
        lines.append(f"lowest KL/ref: layer {names[best]} ({mean[4, best]:.3f})")
    return "\n".join(lines)


def write_layer_csv(path, recs, layer, fields, names):
    """Per-layer means of ``layer (n, 6, L)`` overall and per group, as ``layers.csv``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["field", "value", "layer", "n", *METRICS])
        for fld, val, idx in groups(recs, fields):
            mean, n = layer_table(layer[idx])
            for l in range(layer.shape[2]):
                w.writerow([fld, val, names[l], int(n[:, l].min()) if len(idx) else 0,
                            *[f"{mean[j, l]:.6g}" for j in range(len(METRICS))]])


def profile_layers(meta, recs, layer):
    """The per-layer metrics the tables and plots show: ``layer`` itself, or for a sweep
    run with ``--profile authors`` the authors' metrics from each record's
    ``extra.authors`` (``(n, 6, L)``, NaN where a sample has none)."""
    if meta.get("profile", "exact") != "authors":
        return layer
    out = np.full(layer.shape, np.nan, np.float32)
    for i, r in enumerate(recs):
        a = (r.get("extra") or {}).get("authors")
        if a is not None:
            out[i] = np.array([[np.nan if v is None else v for v in row] for row in a], np.float32)
    return out


def write_tables(out_dir, recs, head, layer, fields, layers=None):
    sdir = os.path.join(out_dir, "summary")
    os.makedirs(sdir, exist_ok=True)
    L, H = head.shape[2], head.shape[3]
    names = list(range(L)) if layers is None else list(layers)
    write_layer_csv(os.path.join(sdir, "layers.csv"), recs, layer, fields, names)
    with open(os.path.join(sdir, "heads.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["field", "value", "layer", "head", "n", *METRICS])
        for fld, val, idx in groups(recs, fields):
            mean, n = _nanmean(head[idx].astype(np.float64), axis=0)  # (6, L, H)
            for l in range(L):
                for h in range(H):
                    w.writerow([fld, val, names[l], h, int(n[:, l, h].min()) if len(idx) else 0,
                                *[f"{mean[j, l, h]:.6g}" for j in range(len(METRICS))]])
    mean, _ = layer_table(layer)
    text = format_layer_table(mean, len(recs), layers=names)
    with open(os.path.join(sdir, "layers.txt"), "w") as f:
        f.write(text + "\n")
    return text


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_layers(path, recs, layer, field=None, title="", layers=None):
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
    names = ("AR (higher is better)", "KL (lower is better)", "JS (lower is better)")
    grp = [g for g in groups(recs, [field] if field else []) if g[0] == (field or "all")]
    if field:
        grp = [("all", "all", np.arange(len(recs)))] + grp
    L = layer.shape[2]
    x = np.arange(L) if layers is None else np.asarray(layers)
    for row, (off, kind) in enumerate(((0, "question"), (3, "reference-normalised"))):
        for col in range(3):
            ax = axes[row, col]
            for fld, val, idx in grp:
                mean, _ = layer_table(layer[idx])
                style = dict(color="black", ls="--", lw=1.2) if fld == "all" and field else {}
                ax.plot(x, mean[off + col], marker="o", ms=3, label=f"{val} (n={len(idx)})", **style)
            if col == 0:
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{names[col]}, {kind}", fontsize=10)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("LLM layer")
    axes[0, 0].legend(fontsize=8, title=field or None)
    fig.suptitle(title or "Grounding per layer (head-mean attention of the last prompt token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heads(path, head, title="", layers=None, marks=None, mark_label="marked"):
    """Layer × head mean KL heatmaps; ``marks`` (``(layer, head)`` pairs, e.g. the heads a
    model was built with) are outlined and named ``mark_label`` in the legend."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    L, H = head.shape[2], head.shape[3]
    names = list(range(L)) if layers is None else list(layers)
    col = {int(n): i for i, n in enumerate(names)}
    for ax, j, kind in ((axes[0], 1, "KL, question maps"), (axes[1], 4, "KL, reference-normalised")):
        mean, _ = _nanmean(head[:, j].astype(np.float64), axis=0)  # (L, H)
        im = ax.imshow(mean.T, aspect="auto", origin="lower", cmap="viridis_r")
        if layers is not None:
            step = max(1, L // 16)
            ax.set_xticks(range(0, L, step), [str(names[i]) for i in range(0, L, step)])
        ax.set_yticks(range(0, H, max(1, H // 16)))
        ax.set_xlabel("layer")
        ax.set_ylabel("head")
        ax.set_title(f"{kind} (lower is better)", fontsize=10)
        if np.isfinite(mean).any():
            l, h = np.unravel_index(np.nanargmin(mean), mean.shape)
            ax.plot([l], [h], marker="*", color="red", ms=12, ls="", label="best")
        for i, (ml, mh) in enumerate(m for m in (marks or ()) if int(m[0]) in col and 0 <= int(m[1]) < H):
            ax.add_patch(Rectangle((col[int(ml)] - 0.5, int(mh) - 0.5), 1, 1, fill=False, ec="white", lw=2.5,
                                   ls="--", label=mark_label if i == 0 else None))
        if marks:
            ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
        fig.colorbar(im, ax=ax, fraction=0.046, label="mean KL (nats)")
    fig.suptitle(title or f"Mean KL per layer and head ({head.shape[0]} samples; star = best)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _paint(cells, values, width, height):
    """Per-token values painted on a ``(height, width)`` canvas through the token cells."""
    canvas = np.full((height, width), np.nan)
    for (x0, y0, x1, y1), v in zip(cells, values):
        if not (np.isfinite(x0) and np.isfinite(v)):
            continue
        xa, xb = int(np.clip(np.floor(x0), 0, width)), int(np.clip(np.ceil(x1), 0, width))
        ya, yb = int(np.clip(np.floor(y0), 0, height)), int(np.clip(np.ceil(y1), 0, height))
        canvas[ya:yb, xa:xb] = v
    return canvas


def plot_overlays(path, out_dir, meta, recs, layer, n: int):
    """Up to ``n`` samples with kept maps; returns how many were drawn.

    Per sample: the image, then the head-mean map of the layer with the lowest mean KL/ref
    for the question prompt, for the reference prompt, and their ratio, each as attention
    per token ÷ its mean over the image (1 = uniform), on one colour scale per row.
    """
    L, H = int(meta["L"]), int(meta["H"])
    chosen = [r for r in recs if r.get("maps_file")][:n]
    if not chosen:
        return 0
    mean, _ = layer_table(layer)
    best = int(np.nanargmin(mean[4])) if np.isfinite(mean[4]).any() else L // 2
    best_name = (meta.get("layers") or list(range(L)))[best]
    plt = _plt()
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(len(chosen), 4, figsize=(13, 3.4 * len(chosen) + 0.6), squeeze=False,
                             constrained_layout=True)
    for row, rec in zip(axes, chosen):
        maps_q, maps_ref, cells = read_maps(out_dir, rec, L, H)
        try:
            img = read_image(rec["image"])
        except ImageReadError:
            img = None
        width, height = (img.size if img is not None else tuple(rec.get("image_size") or (336, 336)))
        a = maps_q[best].mean(axis=0)
        ref = np.maximum(maps_ref[best].mean(axis=0), np.finfo(np.float32).tiny)
        i = rec["row"]
        panels = [(row[1], a, f"layer {best_name}, question prompt\nKL {layer[i, 1, best]:.2f}  AR {layer[i, 0, best]:.2f}"),
                  (row[2], ref, f"layer {best_name}, reference prompt"),
                  (row[3], a / ref, f"question ÷ reference\nKL/ref {layer[i, 4, best]:.2f}  "
                                    f"AR/ref {layer[i, 3, best]:.2f}")]
        rel = [vals / np.nanmean(vals) for _, vals, _ in panels]
        vmax = max(float(np.nanmax(v)) for v in rel)
        for (ax, _, title), vals in zip(panels, rel):
            if img is not None:
                ax.imshow(img)
            canvas = _paint(cells, vals, width, height)
            im = ax.imshow(canvas, cmap="jet", vmin=0, vmax=vmax, alpha=0.5 if img is not None else 1.0,
                           extent=(0, width, height, 0))
            ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=list(row[1:]), fraction=0.02, pad=0.01, label="attention ÷ mean (1 = uniform)")
        if img is not None:
            row[0].imshow(img)
        q = rec["question"]
        row[0].set_title(q if len(q) <= 48 else q[:48] + "\n" + q[48:96], fontsize=9)
        for ax in row:
            for (x, y, w, h) in rec["boxes"]:
                ax.add_patch(Rectangle((x, y), w, h, fill=False, ec="red", lw=1.5))
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
            ax.axis("off")
    fig.suptitle("Last-token attention over the image (red: ground-truth boxes)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(chosen)


def write_report(out_dir: str, *, overlays: int = 6, group_by=None, marked_heads=None,
                 mark_label: str = "marked") -> dict:
    """Tables and plots of a merged sweep; returns the written paths and the layer text.
    ``marked_heads``: ``(layer, head)`` pairs outlined in ``heads_kl.png`` as ``mark_label``."""
    meta, recs, head, exact = load_results(out_dir)
    fields = breakdown_fields(recs) if group_by is None else check_group_by(recs, group_by)
    layers = meta.get("layers")
    layer = profile_layers(meta, recs, exact)
    text = write_tables(out_dir, recs, head, layer, fields, layers)
    if layer is not exact:
        write_layer_csv(os.path.join(out_dir, "summary", "layers_exact.csv"), recs, exact, fields,
                        list(layers or range(exact.shape[2])))
        text = "metrics: the paper authors' conventions (--profile authors; exact ones in summary/layers_exact.csv)\n" \
            + text
    pdir = os.path.join(out_dir, "plots")
    os.makedirs(pdir, exist_ok=True)
    paths = {"layers_csv": os.path.join(out_dir, "summary", "layers.csv"),
             "heads_csv": os.path.join(out_dir, "summary", "heads.csv")}
    if layer is not exact:
        paths["layers_exact_csv"] = os.path.join(out_dir, "summary", "layers_exact.csv")
    if len(recs):
        prefer = [f for f in ("modality", "task", "label") if f in fields] + fields
        title = f"{meta.get('model')}: grounding per layer" + (" (authors' metrics)" if layer is not exact else "")
        paths["layers_png"] = os.path.join(pdir, "layers.png")
        plot_layers(paths["layers_png"], recs, layer, prefer[0] if prefer else None, title, layers)
        paths["heads_png"] = os.path.join(pdir, "heads_kl.png")
        plot_heads(paths["heads_png"], head, f"{meta.get('model')}: mean KL per layer and head "
                                             f"({len(recs)} samples; star = best)", layers,
                   marks=marked_heads, mark_label=mark_label)
        p = os.path.join(pdir, "overlays.png")
        if overlays > 0 and plot_overlays(p, out_dir, meta, recs, layer, overlays):
            paths["overlays_png"] = p
        elif os.path.exists(p):
            os.remove(p)  # an earlier report's overlays would no longer match this one
        if overlays > 0 and "overlays_png" not in paths:
            text += ("\nno overlays: no sample kept its maps (the sweep keeps the first --overlays samples' maps, "
                     "or every sample's with --save-maps)")
    return {"paths": paths, "text": text}


def check_group_by(recs, group_by) -> list:
    """``group_by`` fields, each of which at least one sample carries; else UsageError
    listing the fields there are."""
    from ..clitools import UsageError

    have = sorted({k for r in recs for k in r["fields"]})
    missing = [f for f in group_by if f not in have]
    if missing:
        raise UsageError(f"--group-by: no sample has the field(s) {missing}; the samples carry "
                         f"{have or 'no fields'}")
    return list(group_by)


def add_arguments(p):
    p.add_argument("--sweep", required=True, help="the --out directory of a finished sweep")
    p.add_argument("--overlays", type=at_least(0), default=6, help="samples to draw in overlays.png")
    p.add_argument("--group-by", action="append", default=None,
                   help="carried field to break down by (repeatable; default: every field with 2-20 values)")


def run(args) -> int:
    from ..clitools import UsageError, logger
    from ..outdir import OutputLock

    if not os.path.isdir(args.sweep):
        raise UsageError(f"--sweep: {args.sweep!r} is not a folder; expected the --out folder of a sweep")
    with OutputLock(args.sweep):  # not while a sweep is writing (merging) this folder
        try:
            load_results(args.sweep)
        except ValueError as e:
            raise UsageError(str(e)) from None
        res = write_report(args.sweep, overlays=args.overlays, group_by=args.group_by)
    logger.info(res["text"])
    for k, v in res["paths"].items():
        logger.info(f"{k}: {v}")
    return 0
