"""Model-level benchmarks: what a user of the library pays, as ratios to what they would
otherwise run, measured in the same run.

Model (``_benchlib``): on a GPU a random-initialised LLaVA whose LLM has the shape of a 7B
model (28 layers, width 3584, 28 query / 4 KV heads, D = 128, MLP 18944) in bfloat16, a
576-token image (24 × 24), prompts of S = 1200 tokens, batch 1 (and 8 in the full set);
on CPU the tiny-but-long LLaVA (8 layers of width 512, 8 / 2 heads, D = 64), N = 576,
S = 630, batch 2, float32. Both are built from config objects through the sweep's loader
(``vgkernels.integrations.loaders.load_model``), no weights. Only public names are used:
``vgkernels.patch_model``, ``vgkernels.KnockoutPlan``, ``vgkernels.VGRefine``, the sweep's
``load_model`` / ``load_samples`` / ``sweep``.

Groups and providers (``× base`` in the results is throughput relative to the baseline;
the targets are stated as cost ratios, row median / baseline median):

``model forward ...`` — one prefill forward of the whole batch:

- ``unpatched`` (baseline): the model's own forward (SDPA in every layer);
- ``capture-all``: the same forward inside ``patch_model(model, capture="all")``, patched
  once outside the timing, ``vg.maps`` read after each forward;
- ``knockout-L{L/2}``: inside ``patch_model(model, capture=None,
  knockout=KnockoutPlan(layers=[L // 2], keep=...))`` with a random half of the image kept;
- ``capture-all+patch-per-call``: ``with patch_model(...)`` entered and left around every
  forward (what a one-off call costs);
- the capture and knockout rows are measured once per execution, suffixed ``/composed``
  and ``/fused``; the targets read the ``composed`` (default) rows.

Before timing, the capture row checks that ``vg.maps`` is ``(B, L, H, N)`` and finite and
that its logits equal the unpatched ones (capture is passive); the knockout row checks
that its logits differ from them (the knockout really ran).

``refine ...`` — one question, batch 1 (the authors' setting), 8 new tokens (EOS switched
off in every provider, so each decodes exactly 8):

- ``plain-generate`` (baseline): ``model.generate`` of the question prompt;
- ``vgrefine``: ``vgkernels.VGRefine`` with its defaults (the 7B head preset and layer 16
  on the GPU model; 8 heads of layers 2–5 and layer 4 on the CPU model);
- ``naive-3pass-eager``: the authors' recipe on the eager model — two full forwards with
  ``output_attentions=True`` (question, reference prompt), triage, and ``generate`` with a
  dense additive knockout mask at the knockout layer.

``sweep ...`` — grounding metrics (AR/KL/JS per layer and head, with and without the
reference prompt) for a set of image files with boxes, from a manifest:

- ``output_attentions-loop`` (baseline): the authors' way — per sample, load and process
  the image, one eager forward with ``output_attentions=True`` for the question and one
  for the reference prompt, the last row's image span sliced from every layer, metrics;
- ``sweep``: ``vgkernels.sweep.command.sweep`` (what ``vgkernels sweep`` runs) into a fresh
  output folder per call, batches of ``B``, reports off.

The note gives samples/s.

Timing (``conftest.measure(level="model")``): CUDA events on a GPU; on CPU the process
CPU time on one thread (the median of the rounds), which other jobs on a shared machine
disturb far less than wall-clock time.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

from _benchlib import (CUDA, MODEL_BATCHES, MODEL_LABEL, MODEL_SEQ, MODEL_SIZES, N_IMAGE, SHAPE_SET, chat, images,
                       llava, model_inputs, n_layers, to_device)

DT = "bfloat16" if CUDA else "float32"
G_NEW = 8
QUESTION = "Is there a bright rectangle in the upper part of the image?"
ANSWER_LINE = "Answer the question using a single word or phrase."
REFERENCE = "Write a general description of the image."
if SHAPE_SET == "full":
    N_SWEEP, SWEEP_BATCH = 32, 16
elif SHAPE_SET == "reduced":
    N_SWEEP, SWEEP_BATCH = 16, 16
else:
    N_SWEEP, SWEEP_BATCH = 8, 8
# Timed calls per row: a forward is tens of ms on the GPU; generate, refine and sweep are
# whole pipelines (and a CPU round costs seconds).
ROUNDS = ({"forward": 10, "refine": 5, "sweep": 3, "pairs": 10} if CUDA else
          {"forward": 3, "refine": 3, "sweep": 3, "pairs": 5})


EXECUTIONS = ("composed", "fused")


def _sfx(e):
    return f"/{e}"


def _ko_layer(L: int) -> int:
    return L // 2


FORWARD = (["unpatched"] + [f"capture-all{_sfx(e)}" for e in EXECUTIONS]
           + [f"knockout{_sfx(e)}" for e in EXECUTIONS] + ["capture-all+patch-per-call"])

_CACHE: dict = {}


def _forward_case(B: int):
    key = ("fwd", B)
    if key not in _CACHE:
        for k in [k for k in _CACHE if isinstance(k, tuple) and k[0] == "fwd"]:
            del _CACHE[k]  # one batch size's inputs at a time
        bundle = llava("sdpa")
        inputs = model_inputs(bundle, B, MODEL_SEQ)
        g = torch.Generator().manual_seed(5)
        keep = (torch.rand(B, N_IMAGE, generator=g) >= 0.5).to(next(bundle.model.parameters()).device)
        with torch.no_grad():
            ref = bundle.model(**inputs).logits.float()
        _CACHE[key] = (bundle, inputs, keep, ref)
    return _CACHE[key]


def _exe_kw(provider: str) -> dict:
    _, _, e = provider.partition("/")
    return {"execution": e} if e else {}


@pytest.mark.parametrize("provider", FORWARD)
@pytest.mark.parametrize("B", MODEL_BATCHES, ids=lambda b: f"B{b}")
def test_model_forward(measure, provider, B):
    import vgkernels

    bundle, inputs, keep, ref_logits = _forward_case(B)
    model = bundle.model
    L = n_layers(model)
    lko = _ko_layer(L)
    group = f"model forward {MODEL_LABEL} B={B} S={MODEL_SEQ} {DT}"
    shape = f"L{L} H{MODEL_SIZES['num_heads']}/{MODEL_SIZES['num_kv_heads']} N{N_IMAGE} S{MODEL_SEQ} B{B}"
    name = provider if not provider.startswith("knockout") else provider.replace("knockout", f"knockout-L{lko}", 1)
    kw = dict(provider=name, group=group, shape=shape, baseline=provider == "unpatched", rounds=ROUNDS["forward"],
              level="model")
    extra = {"execution": _exe_kw(provider).get("execution", "composed")}
    # Capture is passive: the logits equal the unpatched model's to the dtype's tolerance (a
    # fused execution recomputes whole layers, so bf16 rounding differs a little).
    tol = dict(atol=5e-2, rtol=5e-2) if CUDA else dict(atol=1e-3, rtol=1e-3)

    forward = lambda: model(**inputs)  # noqa: E731
    pair = dict(paired=forward, paired_rounds=ROUNDS["pairs"])
    with torch.no_grad():
        if provider == "unpatched":
            measure(forward, note="model's own forward (sdpa)", **kw)
        elif provider == "capture-all+patch-per-call":
            def fn():
                with vgkernels.patch_model(model, capture="all") as vg:
                    model(**inputs)
                return vg.maps

            measure(fn, note="patch_model entered and left around every forward", extra=extra, **kw, **pair)
        else:
            if provider.startswith("capture-all"):
                patch = lambda: vgkernels.patch_model(model, capture="all", **_exe_kw(provider))  # noqa: E731
                note = "patched once, outside the timing"
            else:
                plan = vgkernels.KnockoutPlan(layers=[lko], keep=keep)
                patch = lambda: vgkernels.patch_model(model, capture=None, knockout=plan,  # noqa: E731
                                                      **_exe_kw(provider))
                note = f"one-layer knockout at layer {lko}, half the image kept; patched outside the timing"
            with patch() as vg:  # what the row claims, checked before it is timed
                out = model(**inputs)
                if provider.startswith("capture-all"):
                    maps = vg.maps
                    assert maps is not None and tuple(maps.shape) == (B, L, MODEL_SIZES["num_heads"], N_IMAGE), \
                        None if maps is None else tuple(maps.shape)
                    assert torch.isfinite(maps).all(), "capture produced non-finite maps"
                    torch.testing.assert_close(out.logits.float(), ref_logits, **tol,
                                               msg="capture-only logits differ from the unpatched model's")
                else:
                    assert not torch.allclose(out.logits.float(), ref_logits, atol=1e-6, rtol=0), \
                        "the knockout left the logits unchanged: it did not run"
            measure(forward, note=note, extra=extra, context=patch, **kw, **pair)


# ----------------------------------------------------------------------------- VGRefine


def _refine_setup():
    if "refine" not in _CACHE:
        from vgkernels.integrations.tiny import test_image

        bundle = llava("sdpa")
        L = n_layers(bundle.model)
        if L == 28 and MODEL_SIZES["num_heads"] == 28:
            from vgkernels.presets import resolve_heads

            heads, layers = resolve_heads("huatuogpt-vision-7b"), [16]
        else:
            heads = [(4, 1), (3, 0), (5, 3), (2, 2), (4, 6), (3, 5), (5, 0), (2, 7)]
            layers = [_ko_layer(L)]
        _CACHE["refine"] = dict(bundle=bundle, image=test_image(320, 240, seed=1), heads=heads, layers=layers)
    return _CACHE["refine"]


def _prompt_inputs(bundle, image, text):
    return to_device(bundle.processor(images=[image], text=[chat(bundle.processor, text)], return_tensors="pt"),
                     bundle.model)


def naive_three_pass(eager, processor, image, G, heads, layers, p=50.0):
    """The authors' recipe (batch 1, eager attention, dense additive mask)."""
    from types import SimpleNamespace

    bundle = SimpleNamespace(model=eager, processor=processor)
    q_in = _prompt_inputs(bundle, image, f"{QUESTION}\n{ANSWER_LINE}")
    r_in = _prompt_inputs(bundle, image, f"{REFERENCE} {ANSWER_LINE}")
    tid = eager.config.image_token_index
    dev = q_in["input_ids"].device
    qa = eager(**q_in, output_attentions=True).attentions
    ra = eager(**r_in, output_attentions=True).attentions
    ids = q_in["input_ids"][0]
    cols = torch.nonzero(ids == tid).flatten()
    s0, N = int(cols[0]), int(cols.numel())
    rs0 = int(torch.nonzero(r_in["input_ids"][0] == tid).flatten()[0])
    agg = torch.stack([qa[l][0, h, -1, s0:s0 + N].float() / ra[l][0, :, -1, rs0:rs0 + N].float().mean(0)
                       for l, h in heads]).mean(0).cpu().numpy()
    keep = torch.from_numpy(agg >= np.percentile(agg, p)).to(dev)
    S = ids.numel()
    neg = torch.finfo(qa[0].dtype).min
    knock = torch.zeros(1, 1, S, S, dtype=qa[0].dtype, device=dev)
    knock[:, :, s0 + N:, torch.arange(s0, s0 + N, device=dev)[~keep]] = neg

    def add(mod, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if hs.shape[1] == S:
            m = kwargs.get("attention_mask")
            if m is None:
                m = torch.triu(torch.full((S, S), neg, dtype=hs.dtype, device=dev), 1)[None, None]
            kwargs["attention_mask"] = m + knock
            return args, kwargs
        return None

    hooks = [eager.model.language_model.layers[l].self_attn.register_forward_pre_hook(add, with_kwargs=True)
             for l in layers]
    try:
        return eager.generate(**q_in, max_new_tokens=G, min_new_tokens=G, do_sample=False)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("provider", ["plain-generate", "vgrefine", "naive-3pass-eager"])
def test_refine(measure, record, provider):
    import vgkernels

    st = _refine_setup()
    bundle, image, heads, layers = st["bundle"], st["image"], st["heads"], st["layers"]
    model, proc = bundle.model, bundle.processor
    group = f"refine per question {MODEL_LABEL} B=1 G={G_NEW} {DT}"
    kw = dict(provider=provider, group=group, shape=f"B1 N{N_IMAGE} G{G_NEW} knockout layers {layers}",
              baseline=provider == "plain-generate", rounds=ROUNDS["refine"], level="model")
    with torch.no_grad():
        if provider == "plain-generate":
            q_in = _prompt_inputs(bundle, image, f"{QUESTION}\n{ANSWER_LINE}")
            out = model.generate(**q_in, max_new_tokens=G_NEW, min_new_tokens=G_NEW, do_sample=False)
            assert out.shape[1] - q_in["input_ids"].shape[1] == G_NEW
            measure(lambda: model.generate(**q_in, max_new_tokens=G_NEW, min_new_tokens=G_NEW, do_sample=False),
                    note=f"model.generate, {G_NEW} new tokens (min_new_tokens={G_NEW})", **kw)
        elif provider == "vgrefine":
            q_in = _prompt_inputs(bundle, image, f"{QUESTION}\n{ANSWER_LINE}")
            plain = lambda: model.generate(**q_in, max_new_tokens=G_NEW, min_new_tokens=G_NEW,  # noqa: E731
                                           do_sample=False)
            vr = vgkernels.VGRefine(model, proc, heads=heads, layers=layers, max_new_tokens=G_NEW)
            note = "VGRefine defaults"
            if hasattr(vr, "eos"):
                vr.eos = []  # decode exactly G_NEW tokens, as the baseline
                note += f"; EOS off ({G_NEW} tokens)"
            res = vr([image], [QUESTION])
            assert tuple(res.tokens.shape) == (1, G_NEW), tuple(res.tokens.shape)
            measure(lambda: vr([image], [QUESTION]), note=note, paired=plain, paired_rounds=ROUNDS["pairs"], **kw)
        else:
            eager = llava("eager").model
            out = naive_three_pass(eager, proc, image, G_NEW, heads, layers)
            measure(lambda: naive_three_pass(eager, proc, image, G_NEW, heads, layers),
                    note="authors' recipe: 2 output_attentions forwards + dense-mask generate", **kw)


# ----------------------------------------------------------------------------- sweep


def _sweep_data():
    if "sweep" not in _CACHE:
        from vgkernels.sweep.datasets import load_samples

        root = tempfile.mkdtemp(prefix="bench_sweep_")
        questions = [QUESTION, "Where is the square?", "Does this image show a lesion in the upper left region?",
                     "Size of the object?"]
        rows = []
        for i, img in enumerate(images(N_SWEEP, 320, 240, seed=100)):
            img.save(os.path.join(root, f"{i}.png"))
            rows.append({"id": f"s{i}", "image": f"{i}.png", "question": questions[i % len(questions)],
                         "bbox": [[40.0 + 3 * i, 60.0, 120.0, 90.0]]})
        manifest = os.path.join(root, "manifest.jsonl")
        with open(manifest, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        samples, rejects = load_samples(manifest)
        assert len(samples) == N_SWEEP and not rejects, rejects
        _CACHE["sweep"] = dict(root=root, samples=samples)
    return _CACHE["sweep"]


def _output_attentions_loop(bundle, samples):
    """The authors' loop: batch 1, eager, ``output_attentions=True``, question and reference."""
    from PIL import Image

    import vgkernels

    model, proc = bundle.model, bundle.processor
    tid = model.config.image_token_index
    out = []
    for s in samples:
        img = Image.open(s.image).convert("RGB")
        maps = []
        for text in (f"{s.question} {ANSWER_LINE}", REFERENCE):
            inp = to_device(proc(images=[img], text=[chat(proc, text)], return_tensors="pt"), model)
            att = model(**inp, output_attentions=True).attentions
            cols = torch.nonzero(inp["input_ids"][0] == tid).flatten()
            ks, n = int(cols[0]), int(cols.numel())
            maps.append(torch.stack([a[0, :, -1, ks:ks + n].float() for a in att]))  # (L, H, N)
        q, r = maps
        g = int(round(q.shape[-1] ** 0.5))
        mask = vgkernels.box_mask(vgkernels.grid_layout((g, g), img.size), s.boxes).to(q.device)
        ref = r.mean(1).clamp_min(torch.finfo(torch.float32).tiny)
        out.append([vgkernels.grounding_metrics(q, mask), vgkernels.grounding_metrics(q, mask, reference=ref[:, None]),
                    vgkernels.grounding_metrics(q.mean(1), mask),
                    vgkernels.grounding_metrics(q.mean(1), mask, reference=ref)])
    return out


@pytest.mark.parametrize("provider", ["output_attentions-loop", "sweep"])
def test_sweep(measure, record, provider):
    data = _sweep_data()
    samples = data["samples"]
    group = f"sweep {N_SWEEP} samples {MODEL_LABEL} {DT}"
    L, H = n_layers(llava("sdpa").model), MODEL_SIZES["num_heads"]
    kw = dict(provider=provider, group=group, shape=f"{N_SWEEP} samples L{L} H{H} N{N_IMAGE}",
              baseline=provider == "output_attentions-loop", rounds=ROUNDS["sweep"], level="model")
    with torch.no_grad():
        if provider == "output_attentions-loop":
            bundle = llava("eager")
            ms = measure(lambda: _output_attentions_loop(bundle, samples), note="batch 1, eager", **kw)
        else:
            from vgkernels.sweep.command import sweep

            bundle = llava("sdpa")

            def fn():
                out = tempfile.mkdtemp(dir=data["root"], prefix="out_")
                try:
                    res = sweep(bundle, samples, out, batch_size=SWEEP_BATCH, overlays=0, progress=False,
                                report=False, log=lambda *a, **k: None)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                assert res["done"] == len(samples), res
                return res

            # Alternating pairs with the loop on a GPU; on CPU a pair costs half a minute.
            pair = dict(paired=lambda: _output_attentions_loop(llava("eager"), samples), paired_rounds=3) if CUDA \
                else {}
            ms = measure(fn, note=f"vgkernels sweep, batch {SWEEP_BATCH}", **kw, **pair)
    record(note=f"{'batch 1, eager' if provider != 'sweep' else f'vgkernels sweep, batch {SWEEP_BATCH}'}; "
                f"{N_SWEEP / (ms * 1e-3):.2f} samples/s")
