"""``vgkernels sweep``: grounding metrics of a model over a dataset, batched and resumable.

Example (GPU, a real checkpoint, the authors' COCO questions)::

    torchrun --nproc-per-node 4 -m vgkernels sweep --model /ckpt/llava-1.5-7b-hf \\
        --data COCO_localization_questions.jsonl --image-root /data/coco/val2014 \\
        --image-pattern 'COCO_val2014_{image:012d}.jpg' --out runs/llava-coco --batch-size 16

Outputs (see :mod:`vgkernels.sweep.store` and :mod:`vgkernels.sweep.report`): merged
metrics, ``summary/`` tables, ``plots/`` and ``rejects.jsonl``. Re-running the same
command after an interruption continues where it stopped.

``--profile authors`` reproduces the paper authors' conventions (:mod:`vgkernels.paper`):
question and reference prompts joined to the answer line with a space, and the tables
and plots in their AR/KL/JS conventions (head-mean maps; per-sample values in
``samples.jsonl``'s ``extra.authors``), the exact metrics stored beside them
(``summary/layers_exact.csv``, ``layer_metrics.npy``). The profile is part of the run's
settings: a resumed run with another profile is refused.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from typing import Optional

import numpy as np
import torch

from . import dist
from .._dispatch import BACKENDS
from ..clitools import DTYPES, RunError, UsageError, at_least, check_model_options, progress_enabled
from ..data import image_size
from .datasets import FORMATS, RETRIED_KINDS, SampleError, load_samples, reject_of
from .metrics import MASK_MODES, authors_cells, authors_layer_metrics, sample_mask, sample_metrics
from .runner import DEFAULT_ANSWER_SUFFIX, DEFAULT_REFERENCE, Encoder, MapRunner
from .store import FORMAT_VERSION, SampleResult, ShardWriter, check_or_write_meta, done_ids, merge, read_rejects


def add_arguments(p):
    p.add_argument("--model", default="tiny-llava",
                   help="local Hugging Face model directory, or a built-in tiny model (tiny-grounded, tiny-llava, "
                        "tiny-llava-next, tiny-qwen2-vl, tiny-qwen2.5-vl, tiny-splice, tiny-splice-vila), optionally "
                        "with sizes: tiny-llava:num_layers=8,num_heads=8 (default tiny-llava)")
    p.add_argument("--vision-tower", default=None, metavar="DIR",
                   help="local CLIP tower folder of a LLaVA-codebase checkpoint (default: its config's mm_vision_tower)")
    p.add_argument("--profile", default="exact", choices=PROFILES,
                   help="exact (default): per-row metrics of SPEC §3, newline before the answer line; authors: the "
                        "paper authors' prompts and metric conventions in the tables and plots (vgkernels.paper)")
    p.add_argument("--data", required=True, nargs="+", help="question file(s): authors' JSONL, manifest JSONL or "
                                                             "COCO instances_*.json")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or one this tool created (resumable; one run at a time)")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="input format (default auto: from the file's name and first row)")
    p.add_argument("--image-root", default=None,
                   help="folder the image ids / paths are relative to (must exist; default: the data file's folder)")
    p.add_argument("--image-pattern", default="{image}",
                   help="file name of an image id under --image-root, Python format syntax (default '{image}', "
                        "then .jpg/.jpeg/.png are tried); e.g. 'COCO_val2014_{image:012d}.jpg'")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="samples per forward pass (default 8)")
    p.add_argument("--reference-prompt", default=DEFAULT_REFERENCE,
                   help=f"the prompt whose maps divide the question's (default {DEFAULT_REFERENCE!r})")
    p.add_argument("--answer-suffix", default=DEFAULT_ANSWER_SUFFIX,
                   help="line appended to the question and the reference prompt ('' for none)")
    p.add_argument("--layers", default="all", help="decoder layers to capture: all, or e.g. 0,4,8 or 10-20")
    p.add_argument("--mask", default="auto", choices=MASK_MODES,
                   help="ground truth: gt_tokens when the model's grid is 24x24, else boxes (auto)")
    p.add_argument("--save-maps", action="store_true", help="keep every sample's raw maps (float16, scaled)")
    p.add_argument("--overlays", type=at_least(0), default=6, help="samples whose maps are kept and drawn in overlays.png")
    p.add_argument("--workers", type=at_least(0), default=None,
                   help="DataLoader workers decoding images per rank (default: 0 on CPU, up to 4 on GPU)")
    p.add_argument("--device", default=None,
                   help="torch device of the model (default: cuda:LOCAL_RANK when CUDA is available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto (bfloat16 on CUDA, float32 on CPU), float16, bfloat16, float32")
    p.add_argument("--attn-implementation", default=None, help="attention of uncaptured layers (default: the model's)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="vgkernels kernel backend for patch_model (default auto)")
    add_device_map_arguments(p, torchrun=True)
    p.add_argument("--seed", type=int, default=0, help="seed of tiny weights and COCO question templates")
    p.add_argument("--limit", type=at_least(1), default=None, help="use only the first N samples")
    p.add_argument("--no-prefix-sharing", action="store_true",
                   help="run both prompts in full instead of sharing the image prefix's KV cache")
    p.add_argument("--overwrite", action="store_true",
                   help="delete --out first; only a folder this tool created (it holds .vgkernels.json) is deleted")
    p.add_argument("--no-report", action="store_true", help="merge the results but write no tables or plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Seconds to sleep after each batch: lets tests interrupt a sweep mid-run.
    p.add_argument("--throttle", type=float, default=0.0, help=argparse.SUPPRESS)


def add_device_map_arguments(p, torchrun: bool = False):
    """``--device-map`` (and, for torchrun commands, ``--gpus-per-instance``)."""
    p.add_argument("--device-map", default=None, choices=("auto",),
                   help="split the model over the visible GPUs of this process (transformers/accelerate "
                        "device_map='auto'), for checkpoints that do not fit one GPU (34B-72B)")
    if torchrun:
        p.add_argument("--gpus-per-instance", type=int, default=None, metavar="K",
                       help="under torchrun: each process holds one copy of the model split over K GPUs (local "
                            "rank r uses GPUs r*K..r*K+K-1; start nproc-per-node = GPUs / K); implies "
                            "--device-map auto")


def default_workers(device, world: int = 1) -> int:
    """Image-decoding workers per rank: none on CPU, where the model's own intra-op
    threads already use every core (an extra busy process makes them wait on each
    other); on a GPU up to 4, sharing the cores with the other ranks of this node."""
    if torch.device(device).type == "cpu":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // max(1, world) - 1))


def parse_layers(text: str, L: int) -> list:
    if text in (None, "", "all"):
        return list(range(L))
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    bad = [l for l in out if not 0 <= l < L]
    if bad or not out:
        raise ValueError(f"--layers: {text!r} names layers {bad or 'none'}; the model has layers 0..{L - 1}")
    return sorted(set(out))


class _Prepared(torch.utils.data.Dataset):
    def __init__(self, samples, encoder):
        self.samples, self.encoder = samples, encoder

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.encoder(self.samples[i])


def _as_list(x):
    return x


def _length_key(sample, dynamic: bool):
    """Sort key grouping samples of similar prompt length: image size first for families
    whose token count depends on it (the header read is cheap), then question length."""
    size = (image_size(sample.image) or (0, 0)) if dynamic else (0, 0)
    return (size, len(sample.question), sample.index)


def _split_by_prefix(items):
    groups = {}
    for it in items:
        groups.setdefault(it.P, []).append(it)
    return list(groups.values())


PROFILES = ("exact", "authors")


def _results(mb, items, mask_mode, keep_maps, backend, profile="exact"):
    """Per sample of a computed batch: its :class:`SampleResult`, or a reject when its
    ground truth selects no token (``sample_mask`` raises :class:`SampleError`)."""
    out, rejects = [], []
    for b, it in enumerate(items):
        lay = mb.layouts[b]
        n = int(lay.N)
        mq, mr = mb.maps_q[b, :, :, :n], mb.maps_ref[b, :, :, :n]
        try:
            mask, kind = sample_mask(it.sample, lay, mask_mode)
        except SampleError as e:
            rejects.append(reject_of(it.sample, str(e), e.kind))
            continue
        head, layer = sample_metrics(mq, mr, mask.to(mq.device), backend=backend)
        keep = keep_maps(it.sample)
        extra = None
        if profile == "authors":
            am = authors_layer_metrics(mq, mr, authors_cells(it.sample, lay, kind), lay.grid)
            extra = {"authors": [[None if not np.isfinite(v) else float(v) for v in row] for row in am]}
        out.append(SampleResult(it.sample, head, layer, n, tuple(lay.grid), kind, int(mask.sum()),
                                it.image_size,
                                mq.cpu().numpy() if keep else None, mr.cpu().numpy() if keep else None,
                                lay.cells.cpu().numpy() if keep else None, extra))
    return out, rejects


def _run_group(runner, group, mask, keep_maps, backend, profile="exact"):
    """Maps and metrics of samples sharing a prefix length. A sample whose own data
    makes the capture fail (:class:`SampleError`) is rejected and the others are run
    again without it; any other error is not the samples' fault and propagates."""
    results, rejects = [], []
    pending = list(group)
    while pending:
        try:
            res, rej = _results(runner.run(pending), pending, mask, keep_maps, backend, profile)
        except SampleError as e:
            bad = e.samples if e.samples else ([0] if len(pending) == 1 else None)
            if bad is None:  # not said which: one by one
                for it in pending:
                    r1, j1 = _run_group(runner, [it], mask, keep_maps, backend, profile)
                    results += r1
                    rejects += j1
                return results, rejects
            for i in bad:
                rejects.append(reject_of(pending[i].sample, str(e), e.kind))
            pending = [it for i, it in enumerate(pending) if i not in set(bad)]
            continue
        results += res
        rejects += rej
        break
    return results, rejects


def check_first_batch(items, rejects, *, image_root=None,
                      hint: str = "; check --image-root and --image-pattern") -> None:
    """Stop a run that cannot work: more than half of its first batch has no readable
    image (a wrong --image-root or --image-pattern), rather than filling rejects.jsonl."""
    bad = [r for r in rejects if r.kind in RETRIED_KINDS]
    if items and 2 * len(bad) > len(items):
        hint = hint + (f" (image root {image_root!r})" if image_root else "")
        raise RunError(f"{len(bad)} of the first {len(items)} samples have no readable image, e.g. "
                       f"{bad[0].error}{hint}. Nothing was lost: these samples are tried again by the next run")


def reject_summary(rejects, top: int = 5) -> list:
    """Console lines: how many rejects, how many are retried next run, the top kinds with
    an example each."""
    rejects = [r.to_json() if hasattr(r, "to_json") else r for r in rejects]
    if not rejects:
        return ["0 rejects"]
    retried = sum(bool(r.get("retry")) for r in rejects)
    kinds = Counter(r.get("kind") or "malformed row" for r in rejects)
    lines = [f"{len(rejects)} rejected (see rejects.jsonl)"
             + (f"; {retried} with a missing or unreadable image will be tried again by the next run" if retried
                else "")]
    for kind, n in kinds.most_common(top):
        example = next(r for r in rejects if (r.get("kind") or "malformed row") == kind)
        lines.append(f"  {n} x {kind}, e.g. {example.get('source')}:{example.get('line')}: "
                     f"{_short(example.get('error', ''))}")
    if len(kinds) > top:
        lines.append(f"  ... and {len(kinds) - top} other kinds")
    return lines


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _sweep_meta(bundle, layers, H, reference, answer_suffix, mask, n_samples, fingerprint, profile="exact"):
    L_total, _ = bundle.n_layers_heads()
    cfg = bundle.text_config()
    return {"format_version": FORMAT_VERSION, "model": bundle.name, "family": bundle.family,
            "model_type": bundle.model_type, "num_layers": L_total, "num_heads": H,
            "hidden_size": getattr(cfg, "hidden_size", None), "L": len(layers), "H": H, "layers": layers,
            "reference_prompt": reference, "answer_suffix": answer_suffix, "n_samples": n_samples, "mask": mask,
            "profile": profile,
            "fingerprint": dict(fingerprint or {}, model=bundle.name, layers=layers, reference=reference,
                                answer_suffix=answer_suffix, mask=mask, profile=profile)}


def _lock_out(out: str, info, overwrite: bool = False):
    """Rank 0 checks, creates and locks ``out`` (see :mod:`vgkernels.outdir`); the other
    ranks lock their own lock file once it exists."""
    from .. import outdir

    lock = None
    if info.is_main:
        lock = outdir.claim(out, "sweep", overwrite=overwrite, rank=info.rank)
    dist.barrier(info)
    if not info.is_main:
        lock = outdir.OutputLock(out, info.rank).acquire()
    return lock


def sweep(bundle, samples, out: str, *, parse_rejects=(), layers=None, batch_size: int = 8,
          reference: str = DEFAULT_REFERENCE, answer_suffix: Optional[str] = DEFAULT_ANSWER_SUFFIX,
          mask: str = "auto", save_maps: bool = False, overlays: int = 6, workers: int = 0,
          prefix_sharing: bool = True, backend: str = "auto", fingerprint: Optional[dict] = None,
          info: Optional[dist.DistInfo] = None, progress: bool = True, report: bool = True,
          throttle: float = 0.0, log=print, image_root: Optional[str] = None, profile: str = "exact") -> dict:
    """Run (or resume) a sweep of ``bundle`` over ``samples`` into ``out``.

    Every rank calls this with the same ``samples``; each takes its share, and rank 0
    merges and reports. Returns ``{"done": n_new, "seconds": t, "merged": {...}}``.

    ``out`` is locked for the run (a second sweep on it raises
    :class:`vgkernels.outdir.OutputLocked`) and must be new, empty or a folder this tool
    created. Samples whose image is missing or unreadable are rejected and tried again
    by the next run; if more than half of the first batch is, the sweep stops
    (:class:`~vgkernels.clitools.RunError`). A sample whose own data fails
    (:class:`SampleError`: a box outside the image, ...) is rejected; any other error
    stops the sweep.
    """
    info = info or dist.DistInfo()
    if batch_size < 1:
        raise UsageError(f"batch_size: expected >= 1, got {batch_size}")
    L_total, H = bundle.n_layers_heads()
    layers = list(range(L_total)) if layers is None else list(layers)
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {PROFILES}, got {profile!r}")
    meta = _sweep_meta(bundle, layers, H, reference, answer_suffix, mask, len(samples), fingerprint, profile)
    lock = _lock_out(out, info)
    try:
        return _sweep_locked(bundle, samples, out, meta, parse_rejects=parse_rejects, layers=layers,
                             batch_size=batch_size, reference=reference, answer_suffix=answer_suffix, mask=mask,
                             save_maps=save_maps, overlays=overlays, workers=workers, prefix_sharing=prefix_sharing,
                             backend=backend, info=info, progress=progress, report=report, throttle=throttle,
                             log=log, image_root=image_root, profile=profile)
    finally:
        lock.release()


def _sweep_locked(bundle, samples, out, meta, *, parse_rejects, layers, batch_size, reference, answer_suffix, mask,
                  save_maps, overlays, workers, prefix_sharing, backend, info, progress, report, throttle, log,
                  image_root, profile):
    H = meta["H"]
    if info.is_main:
        check_or_write_meta(out, meta, write=True)
    dist.barrier(info)
    check_or_write_meta(out, meta, write=False)
    writer = ShardWriter(out, info.rank, len(layers), H)
    dist.barrier(info)  # every rank has repaired its tail before anyone reads the done ids
    finished = done_ids(out)
    dynamic = bundle.shim.variable_tokens
    ordered = sorted(samples, key=lambda s: _length_key(s, dynamic))
    mine = [s for s in dist.shard(ordered, info) if s.sid not in finished]
    batches = [list(range(i, min(i + batch_size, len(mine)))) for i in range(0, len(mine), batch_size)]
    from ..paper import SEPARATOR

    encoder = Encoder(bundle, reference, answer_suffix, prefix_sharing, sep=SEPARATOR if profile == "authors" else "\n")
    runner = MapRunner(bundle, layers=layers, prefix_sharing=prefix_sharing, backend=backend)
    loader = torch.utils.data.DataLoader(_Prepared(mine, encoder), batch_sampler=batches, num_workers=workers,
                                         collate_fn=_as_list)
    keep_maps = lambda s: save_maps or s.index < overlays
    if info.is_main and len(finished):
        log(f"resuming: {len(finished)} samples already done")
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), unit="sample", desc=f"sweep rank 0/{info.world}", dynamic_ncols=True,
                   file=sys.stderr)
    t0 = time.perf_counter()
    n_done = 0
    # A wrong --image-root shows in the first batch of a fresh folder. (On a resume, the
    # samples left may well be the ones whose images are still missing.)
    first = not finished
    try:
        for items in loader:
            results, rejects = [], []
            for it in items:
                if it.error is not None:
                    rejects.append(reject_of(it.sample, it.error, it.error_kind or "processor failed"))
            good = [it for it in items if it.error is None]
            for group in _split_by_prefix(good):
                res, rej = _run_group(runner, group, mask, keep_maps, backend, profile)
                results += res
                rejects += rej
            writer.append(results)
            writer.reject(rejects)
            if first:
                check_first_batch(items, rejects, image_root=image_root)
                first = False
            n_done += len(items)
            if bar is not None:
                bar.update(len(items))
            if throttle:
                time.sleep(throttle)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    dist.barrier(info)
    merged = None
    if info.is_main:
        merged = merge(out, list(parse_rejects))
        rate = n_done / seconds if seconds > 0 else float("nan")
        log(f"swept {n_done} samples in {seconds:.1f} s ({rate:.2f} samples/s on rank 0 of {info.world}); "
            f"merged {merged['samples']} samples, {merged['rejects']} rejects -> {out}")
        for line in reject_summary(read_rejects(out)):
            log(line)
        if report:
            from .report import write_report

            rep = write_report(out, overlays=overlays)
            log(rep["text"])
            for k, v in rep["paths"].items():
                log(f"  {k}: {v}")
    dist.barrier(info)
    return {"done": n_done, "seconds": seconds, "merged": merged}


def check_inputs(args) -> None:
    """What can be checked before the model is loaded (exit 2 on failure)."""
    for d in args.data:
        if not os.path.isfile(d):
            raise UsageError(f"--data: {d!r} " + ("is a folder, not a file" if os.path.isdir(d) else "does not exist"))
    if args.image_root is not None and not os.path.isdir(args.image_root):
        what = "is not a folder" if os.path.exists(args.image_root) else "does not exist"
        raise UsageError(f"--image-root: {args.image_root!r} {what}")
    if getattr(args, "gpus_per_instance", None) is not None and args.gpus_per_instance < 1:
        raise UsageError(f"--gpus-per-instance: expected >= 1, got {args.gpus_per_instance}")
    check_model_options(args)


def run(args) -> int:
    from vgkernels.integrations.loaders import load_model

    from ..clitools import logger

    check_inputs(args)
    info = dist.init(args.device, gpus_per_instance=dist.gpus_per_instance(args))
    lock = None
    try:
        lock = _lock_out(args.out, info, overwrite=args.overwrite)
        samples, rejects = load_samples(args.data, fmt=args.format, image_root=args.image_root,
                                        image_pattern=args.image_pattern, seed=args.seed, limit=args.limit)
        if not samples:
            # nothing to sweep: fail before the model loads and before any settings are
            # written, so the corrected command starts clean
            why = "it has no rows"
            if rejects:
                kinds = ", ".join(f"{n} x {k}" for k, n in Counter(r.kind for r in rejects).most_common(3))
                why = (f"{len(rejects)} rows rejected ({kinds}), e.g. {rejects[0].source}:{rejects[0].line}: "
                       f"{_short(rejects[0].error)}")
            raise RunError(f"--data: no usable sample in {', '.join(args.data)}: {why}")
        bundle = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn_implementation,
                            seed=args.seed, vision_tower=args.vision_tower, **dist.placement(info, args))
        L, _ = bundle.n_layers_heads()
        try:
            layers = parse_layers(args.layers, L)
        except ValueError as e:
            raise UsageError(str(e)) from None
        workers = args.workers if args.workers is not None else default_workers(bundle.device, info.world)
        fp = {"data": [os.path.abspath(d) for d in args.data], "format": args.format,
              "image_root": os.path.abspath(args.image_root) if args.image_root else None,
              "image_pattern": args.image_pattern, "seed": args.seed, "dtype": args.dtype}
        if info.is_main:
            logger.info(f"{len(samples)} samples, {len(rejects)} rows rejected while parsing; model {bundle.name} "
                        f"({bundle.family}, {L} layers x {bundle.n_layers_heads()[1]} heads) on "
                        f"{bundle.placement()}; {info.world} rank(s)")
        logger.debug(f"rank {info.rank}: layers {layers}, {workers} image worker(s), settings {fp}")
        log = logger.info if info.is_main else (lambda *a, **k: None)
        sweep(bundle, samples, args.out, parse_rejects=rejects, layers=layers, batch_size=args.batch_size,
              reference=args.reference_prompt, answer_suffix=args.answer_suffix or None, mask=args.mask,
              save_maps=args.save_maps, overlays=args.overlays, workers=workers,
              prefix_sharing=not args.no_prefix_sharing, backend=args.backend, fingerprint=fp, info=info,
              progress=progress_enabled(args), report=not args.no_report, throttle=args.throttle,
              log=log, image_root=args.image_root, profile=args.profile)
    finally:
        if lock is not None:
            lock.release()
        dist.finish(info)
    return 0
