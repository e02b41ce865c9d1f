"""``vgkernels demo`` (the default command): a complete grounding sweep, under a minute on a 2-core CPU.

1. Generates ``--n`` images — one shape in a named colour on grey or colour noise, its box
   known exactly — and a question file in the authors' format (``image`` id, ``label``,
   ``question`` from the paper's localisation templates, ``bbox``, ``gt_tokens`` on the
   24×24 grid, ``modality``, ``location``).
2. Sweeps the built-in ``tiny-grounded`` model over it (``vgkernels sweep``): question and
   reference maps for every layer and head, AR/KL/JS, tables and plots.
3. Ranks heads (``vgkernels heads``) and writes ``heads.json``.

``tiny-grounded`` (:mod:`vgkernels.integrations.tiny_grounded`) is built, not trained, so that three
of its heads attend to the image tokens of the colour the question names: the demo's
table and ``layers.png`` show its layers 3 and 5 standing out (AR about 3.4 and 2.5, the
others 1.00), ``heads_kl.png`` outlines the planted heads, which the ranking puts first,
and ``overlays.png`` shows the attention on the boxes for the question prompt and not for
the reference prompt. ``--model tiny-llava`` shows what a random model gives instead. For
a real checkpoint on a GPU, see the README (``vgkernels sweep --model
/path/to/llava-1.5-7b-hf ...``).
"""
from __future__ import annotations

import argparse
import json
import os
import random

import numpy as np

from vgkernels.integrations.tiny_grounded import COLOURS

from ..clitools import at_least
from .datasets import LOCALISATION_TEMPLATES

DEMO_MODEL = "tiny-grounded"
# How long the demo takes; the README's `make demo` paragraph says the same (a test checks).
DEMO_DURATION = "under a minute on a 2-core CPU"
_SHAPES = ("square", "circle", "triangle")


def make_demo_data(out_dir: str, n: int = 32, *, size: int = 112, seed: int = 0) -> str:
    """Write ``out_dir/images/*.png`` and ``out_dir/questions.jsonl``; return the latter.

    Each image is ``size × size`` noise with one shape whose bounding box is the row's
    ``bbox``; ``gt_tokens`` are the 24×24 cells the box overlaps, stored ``[x, y]``.
    """
    import torch
    from PIL import Image, ImageDraw

    from ..layout import box_mask, grid_layout

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    grid = grid_layout((24, 24), (size, size))
    path = os.path.join(out_dir, "questions.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            gray = i % 2 == 0
            if gray:
                noise = np.repeat(nrng.integers(0, 160, (size, size, 1), dtype=np.uint8), 3, axis=2)
            else:
                noise = nrng.integers(0, 160, (size, size, 3), dtype=np.uint8)
            im = Image.fromarray(noise, "RGB")
            colour = rng.choice(sorted(COLOURS))
            shape = rng.choice(_SHAPES)
            w = rng.randint(size // 6, size // 2)
            h = w if shape != "triangle" else rng.randint(size // 6, size // 2)
            x, y = rng.randint(0, size - w), rng.randint(0, size - h)
            d = ImageDraw.Draw(im)
            box = (x, y, x + w - 1, y + h - 1)
            if shape == "square":
                d.rectangle(box, fill=COLOURS[colour])
            elif shape == "circle":
                d.ellipse(box, fill=COLOURS[colour])
            else:
                d.polygon([(x, y + h - 1), (x + w - 1, y + h - 1), (x + (w - 1) / 2, y)], fill=COLOURS[colour])
            image_id = f"demo{i:04d}"
            im.save(os.path.join(img_dir, image_id + ".png"))
            bbox = [[float(x), float(y), float(w), float(h)]]
            cells = torch.nonzero(box_mask(grid, bbox)).flatten().tolist()
            gt = [[t % 24, t // 24] for t in cells]
            label = f"{colour} {shape}"
            cx, cy = x + w / 2, y + h / 2
            location = ("upper" if cy < size / 2 else "lower") + "-" + ("left" if cx < size / 2 else "right")
            question = rng.choice(LOCALISATION_TEMPLATES).format(label=label)
            row = {"image": image_id, "label": label, "question": question, "gt_tokens": gt, "bbox": bbox,
                   "modality": "gray-noise" if gray else "colour-noise", "location": location}
            f.write(json.dumps(row) + "\n")
    return path


def add_arguments(p):
    p.description = (f"{(p.description or 'The demo').rstrip('.')}. Takes {DEMO_DURATION}. The --out folder is "
                     "recreated on every run; only a folder this tool created is deleted.")
    p.add_argument("--out", default="runs/demo",
                   help="output folder, recreated on every run (only if new, empty or created by vgkernels); "
                        "default runs/demo")
    p.add_argument("--model", default=DEMO_MODEL, help=f"model to sweep (default {DEMO_MODEL})")
    p.add_argument("--n", type=at_least(1), default=32, help="number of generated samples (default 32)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="samples per forward pass (default 8)")
    p.add_argument("--top-k", type=at_least(1), default=10, help="heads written to heads.json (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import torch

    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        # The tiny models' matrices are far too small for intra-op parallelism: on a busy
        # 2-core machine the threads wait on each other and the sweep runs many times
        # slower (measured there: 5 s with one thread, 94 s with two).
        torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    from vgkernels.integrations.loaders import parse_tiny

    from .. import outdir
    from ..clitools import logger
    from . import command, heads, report

    # The demo recreates its folder: delete it only when this tool made it.
    lock = outdir.claim(args.out, "demo", overwrite=True, what="demo --out")
    try:
        data_dir = os.path.join(args.out, "data")
        qpath = make_demo_data(data_dir, args.n)
        logger.info(f"generated {args.n} images with known boxes and {qpath} (the authors' question-file format)")
        sweep_dir = os.path.join(args.out, "sweep")
        sp = argparse.ArgumentParser()
        command.add_arguments(sp)
        sargs = sp.parse_args(["--model", args.model, "--data", qpath, "--image-root", os.path.join(data_dir, "images"),
                               "--image-pattern", "{image}.png", "--out", sweep_dir, "--batch-size",
                               str(args.batch_size), "--overlays", "4", "--no-report"]
                              + (["--no-progress"] if args.no_progress else []))
        command.run(sargs)
        planted = None
        if parse_tiny(args.model)[0] == "tiny-grounded":
            from vgkernels.integrations.tiny_grounded import PLANTED_HEADS, PLANTED_LAYERS

            planted = [tuple(h) for h in PLANTED_HEADS]
        rep = report.write_report(sweep_dir, overlays=4, marked_heads=planted, mark_label="planted")
        logger.info(rep["text"])
        if planted:
            logger.info(f"tiny-grounded's planted heads (layer, head), by construction: {planted}, in layers "
                        f"{list(PLANTED_LAYERS)}; every other layer should read AR 1.00 as a random model does")
        hp = argparse.ArgumentParser()
        heads.add_arguments(hp)
        heads.run(hp.parse_args(["--sweep", sweep_dir, "--top-k", str(args.top_k)]))
        if planted:
            with open(os.path.join(sweep_dir, "heads.json")) as f:
                ranked = [(h["layer"], h["head"]) for h in json.load(f)["heads"]][:len(planted)]
            verdict = "the planted heads" if set(ranked) == set(planted) else "NOT the planted heads"
            logger.info(f"the ranking's top {len(planted)}: {ranked}: {verdict}")
        logger.info(f"\nplots: {os.path.join(sweep_dir, 'plots')}/ (layers.png, heads_kl.png, overlays.png); "
                    f"tables: {os.path.join(sweep_dir, 'summary')}/ and {sweep_dir}/{{layers,heads}}.parquet")
    finally:
        lock.release()
    return 0
