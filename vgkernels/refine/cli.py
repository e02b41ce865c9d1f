"""``vgkernels refine``: closed-ended VQA accuracy with and without VGRefine.

::

    vgkernels refine --model DIR_OR_TINY --data questions.jsonl --heads huatuogpt-vision-7b --out runs/rad
    vgkernels refine --model tiny-llava --demo 24 --heads 2:1,1:0,3:3 --layers 2 --out /tmp/demo
    vgkernels refine ... --sweep-k 1,2,5,8,10,15,20 --sweep-p 30,40,50,60,70,80,90 --sweep-layers "16;15,16"

Rows are read by :mod:`vgkernels.refine.eval` (short answers and multiple choice with the
paper's prompt templates). Every setting of the ``K × p × layers`` grid is evaluated from
one capture per batch (:meth:`vgkernels.VGRefine.sweep`), next to plain greedy decoding
("baseline").

``--profile authors`` uses the paper authors' prompts (question and answer line joined by
a space, nothing stripped; the reference prompt with the answer line) and their scoring
(:mod:`vgkernels.paper`); their evaluation files (a JSON list) are read in both profiles.
Decoding is greedy unless ``--do-sample`` (``--temperature``, ``--top-p``,
``--sample-top-k``, ``--repetition-penalty``; ``--seed`` also seeds the draws); the
knockout applies to the prompt rows only. ``--maps question`` triages on the attention
averaged over the question rows (the authors' "Q-mode") instead of the last prompt row.

``OUT`` holds ``run.json`` (the arguments that fix the results, written once they have
all been validated), ``records.jsonl`` (one line per question: responses and correctness
per method, the number of kept image tokens), ``summary.json`` and ``summary.md``
(accuracy overall, by kind and by gold option letter), ``accuracy.csv`` (one row per
method) and, for a K / p / layer sweep, ``accuracy.png`` (accuracy against each swept
value), and ``rejects.jsonl`` (rows that could not be used: malformed rows stay
rejected; questions whose image is missing or unreadable are tried again by the next
run). A run that stops (crash, Ctrl-C) resumes from ``records.jsonl`` when started
again with the same arguments: finished questions are neither recomputed nor duplicated.
``OUT`` is locked while a run writes it (see :mod:`vgkernels.outdir`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from .._dispatch import BACKENDS
from ..clitools import DTYPES, RunError, UsageError, at_least, check_model_options, logger, progress_enabled

RESULT_FIELDS = ("model", "data", "heads", "settings", "max_new_tokens", "reference_prompt", "seed", "dtype",
                 "profile", "maps", "decoding", "vision_tower", "where")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-llava",
                   help="local Hugging Face model directory or a built-in tiny model (tiny-llava, tiny-llava-next, "
                        "tiny-qwen2-vl, tiny-qwen2.5-vl, tiny-splice, tiny-splice-vila, tiny-grounded)")
    p.add_argument("--data", default=None, help="evaluation JSONL: image, question, answer[, options, id]")
    p.add_argument("--demo", type=int, default=None, metavar="N",
                   help="generate N rows of synthetic data into OUT/demo_data and evaluate them")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or one this tool created (resumable; one run at a time)")
    p.add_argument("--heads", default="huatuogpt-vision-7b",
                   help="preset name, heads.json path, or pairs 'layer:head,layer:head,...' ranked best first "
                        "(default huatuogpt-vision-7b, the paper's preset)")
    p.add_argument("--heads-from-any-model", action="store_true",
                   help="accept a heads.json ranked on a model of another name (its layer and head counts must "
                        "still match this model's)")
    p.add_argument("--layers", default="16", help="knockout layers, e.g. 16 or 34,35,36 (default 16, the paper's)")
    p.add_argument("--k", type=at_least(1), default=None, help="top-K heads (default: all given)")
    p.add_argument("--p", type=float, default=50.0, help="percentile threshold (default 50)")
    p.add_argument("--mode", default="renorm", choices=("renorm", "zero"),
                   help="knockout: renorm (-inf before the softmax, the authors' code) or zero (probabilities "
                        "zeroed, not renormalised); default renorm")
    p.add_argument("--sweep-k", default=None, help="comma-separated K values (replaces --k)")
    p.add_argument("--sweep-p", default=None, help="comma-separated percentiles (replaces --p)")
    p.add_argument("--sweep-layers", default=None, help="layer sets separated by ';', e.g. '16;34,35,36'")
    p.add_argument("--reference-prompt", default=None, help="default: 'Write a general description of the image.'")
    p.add_argument("--max-new-tokens", type=at_least(1), default=8, help="greedy answer length in tokens (default 8)")
    p.add_argument("--batch-size", type=at_least(1), default=4, help="questions per batch (default 4)")
    p.add_argument("--limit", type=at_least(1), default=None, help="evaluate only the first N rows")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto (bfloat16 on CUDA, float32 on CPU), float16, bfloat16, float32")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend of the knockout layers (default auto)")
    from ..sweep.command import add_device_map_arguments

    add_device_map_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of tiny weights, demo data and --do-sample draws")
    p.add_argument("--overwrite", action="store_true",
                   help="discard earlier results: empties OUT, only if this tool created it (.vgkernels.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_reproduction_arguments(p)


def add_reproduction_arguments(p: argparse.ArgumentParser) -> None:
    """Profile, LLaVA-codebase vision tower, map rows and decoding settings."""
    p.add_argument("--profile", default="exact", choices=("exact", "authors"),
                   help="exact (default): stripped prompts joined by newlines, normalised scoring; authors: the paper "
                        "authors' prompts and scoring (vgkernels.paper)")
    p.add_argument("--vision-tower", default=None, metavar="DIR",
                   help="local CLIP tower folder of a LLaVA-codebase checkpoint (default: its config's mm_vision_tower)")
    p.add_argument("--maps", default="last", choices=("last", "question"),
                   help="triage maps: the last prompt row (default) or the mean over the question rows (Q-mode)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with --do-sample)")
    p.add_argument("--sample-top-k", type=int, default=None, help="generate()'s top_k (--k is the number of heads)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="generate()'s repetition penalty (1.0 = none; applies to greedy decoding too)")
    p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                   help="evaluate only rows whose field equals VALUE, e.g. dataset=VQA-RAD (repeatable)")


def decoding_settings(args) -> dict:
    """The decoding keywords of :class:`VGRefine` from the command line; sampling options
    without ``--do-sample`` would be ignored, so they are refused."""
    given = [o for o, v, d in (("--temperature", args.temperature, 1.0), ("--top-p", args.top_p, None),
                               ("--sample-top-k", args.sample_top_k, None)) if v != d]
    if given and not args.do_sample:
        raise UsageError(f"{', '.join(given)}: sampling options; add --do-sample (greedy decoding ignores them)")
    return {"do_sample": bool(args.do_sample), "temperature": args.temperature, "top_p": args.top_p,
            "sample_top_k": args.sample_top_k, "repetition_penalty": args.repetition_penalty,
            "seed": args.seed if args.do_sample else None}


def _ints(text: Optional[str], what: str) -> Optional[list]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None


def _floats(text: Optional[str], what: str) -> Optional[list]:
    if text is None:
        return None
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def parse_heads(text: str):
    """A preset / heads.json path, or ``'l:h,l:h'`` pairs."""
    if ":" in text and not os.path.exists(text):
        pairs = []
        for item in text.replace(" ", "").split(","):
            try:
                l, h = item.split(":")
                pairs.append((int(l), int(h)))
            except ValueError:
                raise ValueError(f"--heads: expected 'layer:head' pairs, got {item!r} in {text!r}") from None
        return pairs
    return text


def build_settings(args) -> list:
    from .method import Setting

    ks = _ints(args.sweep_k, "--sweep-k") or [args.k]
    ps = _floats(args.sweep_p, "--sweep-p") or [args.p]
    if args.sweep_layers:
        sets = [tuple(_ints(part, "--sweep-layers")) for part in args.sweep_layers.split(";") if part.strip()]
    else:
        sets = [tuple(_ints(args.layers, "--layers"))]
    return [Setting(k, p, tuple(sorted(ls)), args.mode) for ls in sets for k in ks for p in ps]


def _load_model(args):
    from vgkernels.integrations.loaders import load_model

    place = {"device_map": args.device_map} if getattr(args, "device_map", None) else {"device": args.device}
    b = load_model(args.model, dtype=args.dtype, seed=args.seed, vision_tower=args.vision_tower, **place)
    return b.model, b.processor, b.name


def check_heads_file(spec, model, processor, model_name: str, *, any_model: bool = False) -> None:
    """Refuse a ``heads.json`` ranked on another model: its ``num_layers``, ``num_heads``,
    ``hidden_size`` and ``model_type`` (written by ``vgkernels heads``) must match the
    loaded model's, and its ``model`` name too unless ``any_model``."""
    from vgkernels.integrations.loaders import ModelBundle

    from ..presets import HEADS

    if not isinstance(spec, str) or spec in HEADS or not os.path.isfile(spec):
        return
    try:
        with open(spec) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--heads: cannot read {spec!r} as JSON ({e})") from None
    if not isinstance(doc, dict):
        return  # a bare list of pairs says nothing about its model
    b = ModelBundle(model_name, model, processor, torch_device(model))
    L, H = b.n_layers_heads()
    have = {"num_layers": L, "num_heads": H, "hidden_size": getattr(b.text_config(), "hidden_size", None),
            "model_type": b.model_type}
    bad = [f"{k} {doc[k]!r} (this model: {v!r})" for k, v in have.items()
           if doc.get(k) is not None and v is not None and doc[k] != v]
    source = doc.get("model")
    if not bad and source and not any_model and _model_key(source) != _model_key(model_name):
        bad.append(f"model {source!r} (this model: {model_name!r}; --heads-from-any-model accepts it)")
    if bad:
        raise UsageError(f"--heads: {spec} was ranked on another model: {'; '.join(bad)}. Rank heads on a sweep of "
                         "this model (vgkernels sweep, then vgkernels heads)")


def _model_key(name: str) -> str:
    return os.path.basename(str(name).rstrip("/\\"))


def torch_device(model):
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:  # pragma: no cover
        import torch

        return torch.device("cpu")


def _read_records(path: str) -> list:
    """Finished records; a torn last line (a crash mid-write) is dropped from the file."""
    if not os.path.exists(path):
        return []
    good, size = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                break
            if not raw.endswith(b"\n"):
                break
            good.append(rec)
            size += len(raw)
    if size != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(size)
    return good


def _read_images(chunk, data):
    """Each row's image, or a reject (missing / unreadable: tried again by the next run)."""
    from ..data import ImageReadError, read_image
    from ..sweep.datasets import Reject

    images, rejects = [], []
    for r in chunk:
        try:
            images.append(read_image(r.image))
        except ImageReadError as e:
            images.append(None)
            rejects.append(Reject(data, r.line, str(e), r.id, e.kind))
    return images, rejects


def _check_run_info(out: str, run_info: dict) -> None:
    """Compare with (or, the first time, write) ``OUT/run.json``; called once every
    argument has been validated, so that a failed start leaves no run.json."""
    run_path = os.path.join(out, "run.json")
    if os.path.exists(run_path):
        with open(run_path) as f:
            old = json.load(f)
        diff = [k for k in RESULT_FIELDS if old.get(k) != run_info.get(k)]
        if diff:
            raise UsageError(f"{out} holds a run with different {', '.join(diff)}; use another --out or --overwrite")
        return
    tmp = run_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(run_info, f, indent=2)
    os.replace(tmp, run_path)


def run(args) -> int:
    from .. import outdir

    if (args.data is None) == (args.demo is None):
        raise UsageError("give exactly one of --data FILE or --demo N")
    if args.data is not None and not os.path.isfile(args.data):
        raise UsageError(f"--data: {args.data!r} does not exist")
    check_model_options(args)
    lock = outdir.claim(args.out, "refine", overwrite=args.overwrite)
    try:
        return _run_locked(args)
    finally:
        lock.release()


def _run_locked(args) -> int:
    import torch

    from ..sweep.command import check_first_batch, reject_summary

    from . import eval as RE
    from .. import paper
    from ..constants import REFERENCE_PROMPT
    from ..sweep.heads import _parse_where
    from .method import VGRefine

    data = args.data
    if args.demo is not None:
        data = RE.write_demo_data(os.path.join(args.out, "demo_data"), args.demo, seed=args.seed)
    parse_rejects = []
    try:
        where = _parse_where(args.where)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rows = RE.select_rows(RE.read_rows(data, rejects=parse_rejects), where, data)
    if args.limit is not None:
        rows = rows[: args.limit]
    if not rows:
        raise RunError(f"{data}: no usable row ({len(parse_rejects)} rejected; see {args.out}/rejects.jsonl)"
                       if parse_rejects else f"{data}: no rows")
    try:
        settings = build_settings(args)
        heads = parse_heads(args.heads)
    except ValueError as e:
        raise UsageError(str(e)) from None
    default_ref = paper.REFERENCE_PROMPT if args.profile == "authors" else REFERENCE_PROMPT
    ref = default_ref if args.reference_prompt is None else args.reference_prompt
    decoding = decoding_settings(args)
    run_info = {
        "model": args.model, "data": os.path.abspath(data), "heads": heads if isinstance(heads, str) else
        [list(h) for h in heads], "settings": [s.label() for s in settings], "max_new_tokens": args.max_new_tokens,
        "reference_prompt": ref, "seed": args.seed, "dtype": args.dtype, "profile": args.profile, "maps": args.maps,
        "decoding": decoding, "vision_tower": os.path.abspath(args.vision_tower) if args.vision_tower else None,
        "where": where,
    }
    rec_path = os.path.join(args.out, "records.jsonl")
    _check_previous(args.out, run_info)

    model, processor, model_name = _load_model(args)
    check_heads_file(heads, model, processor, model_name, any_model=args.heads_from_any_model)
    first = settings[0]
    try:
        vr = VGRefine(model, processor, heads=heads, layers=first.layers, percentile=first.p, mode=first.mode,
                      reference_prompt=ref, top_k=first.k, max_new_tokens=args.max_new_tokens, backend=args.backend,
                      maps=args.maps, **decoding)
        settings = [vr.setting(s.k, s.p, s.layers, s.mode) for s in settings]
    except ValueError as e:
        # The defaults are the HuatuoGPT-Vision-7B preset (layer 16); say so when they are
        # the ones that do not fit this model.
        hint = ""
        defaults = args.heads == "huatuogpt-vision-7b" or args.layers == "16"
        if defaults and any(w in str(e).lower() for w in ("layer", "head")):
            hint = (" (--heads defaults to 'huatuogpt-vision-7b' and --layers to 16; give heads and layers that "
                    f"exist in {model_name})")
        raise UsageError(f"{e}{hint}") from None
    _check_run_info(args.out, run_info)  # every argument is valid: now the folder is this run's
    logger.debug(f"refine settings: {run_info}")
    labels = ["baseline"] + [s.label() for s in settings]

    records = _read_records(rec_path)
    done = {r["id"] for r in records}
    todo = [r for r in rows if r.id not in done]
    if done:
        logger.info(f"resuming: {len(done)} questions already done")
    bar = None
    if progress_enabled(args):
        from tqdm import tqdm

        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="refine", unit="q", file=sys.stderr)
    run_rejects = []
    try:
        with open(rec_path, "a") as out:
            for i in range(0, len(todo), args.batch_size):
                chunk = todo[i: i + args.batch_size]
                images, rej = _read_images(chunk, data)
                run_rejects += rej
                if i == 0 and not done:
                    check_first_batch(chunk, rej, hint="; image paths are relative to the data file's folder")
                keep = [b for b, im in enumerate(images) if im is not None]
                if keep:
                    sub = [chunk[b] for b in keep]
                    with torch.no_grad():
                        res = vr.sweep([images[b] for b in keep], [r.prompt(args.profile) for r in sub], settings,
                                       baseline=True)
                    for b, r in enumerate(sub):
                        rec = _record(RE, r, b, res, settings, args.profile)
                        out.write(json.dumps(rec) + "\n")
                        records.append(rec)
                    out.flush()
                    os.fsync(out.fileno())
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        _write_rejects(args.out, parse_rejects + run_rejects)

    order = {r.id: i for i, r in enumerate(rows)}
    records = [r for r in records if r["id"] in order]
    summary = RE.summarize(records, labels)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"model": model_name, "data": os.path.abspath(data), "n_rows": len(rows), "profile": args.profile,
                   "methods": summary}, f,
                  indent=2)
    table = RE.summary_table(summary)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"# VGRefine on {os.path.basename(data)} ({model_name})\n\n{table}\n")
    paths = {"records": rec_path, "summary_json": os.path.join(args.out, "summary.json"),
             "summary_md": os.path.join(args.out, "summary.md")}
    paths.update(RE.write_accuracy(args.out, summary, settings, title=f"VGRefine on {os.path.basename(data)} "
                                                                      f"({model_name})"))
    paths["rejects"] = os.path.join(args.out, "rejects.jsonl")
    logger.info(table)
    for line in reject_summary(parse_rejects + run_rejects):
        logger.info(line)
    logger.info(f"wrote {args.out}/:")
    for k, v in paths.items():
        logger.info(f"  {k}: {v}")
    return 0


def _check_previous(out: str, run_info: dict) -> None:
    """Refuse at once (before loading the model) a folder holding another run."""
    if os.path.exists(os.path.join(out, "run.json")):
        _check_run_info(out, run_info)


def _record(RE, r, b, res, settings, profile: str) -> dict:
    base = res[0].baseline_answers[b]
    results = {"baseline": {"response": base, "correct": RE.is_correct(r, base, profile)}}
    for st, rr in zip(settings, res):
        ans = rr.answers[b]
        results[st.label()] = {"response": ans, "correct": RE.is_correct(r, ans, profile),
                               "kept": int(rr.keep[b].sum()), "N": int(rr.keep[b].numel())}
    return {"id": r.id, "line": r.line, "kind": r.kind, "question": r.question, "answer": r.answer,
            "results": results}


def _write_rejects(out: str, rejects: list) -> None:
    tmp = os.path.join(out, "rejects.jsonl.tmp")
    with open(tmp, "w") as f:
        for r in rejects:
            f.write(json.dumps(r.to_json() if hasattr(r, "to_json") else r) + "\n")
    os.replace(tmp, os.path.join(out, "rejects.jsonl"))
