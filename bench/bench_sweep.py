"""Grounding sweep throughput: ``vgkernels sweep``'s runner against the authors' loop.

Both providers turn the same pre-processed samples (image tensors and token ids made
outside the timing) into question maps, reference maps and AR/KL/JS per layer and head:

- ``eager-output_attentions-b1`` (baseline): the authors' way — batch 1, an eager model,
  ``output_attentions=True``, one full forward for the question prompt and one for the
  reference prompt, the last row's image span sliced from every layer's ``(H, S, S)``
  attention matrix;
- ``sweep-b{B}``: :class:`vgkernels.sweep.runner.MapRunner` as ``vgkernels sweep`` runs
  it — batches of ``B``, SDPA in every layer, the image prefix computed once per sample
  with both suffixes on its KV cache, float32 row capture;
- ``sweep-full-b{B}``: the same without prefix sharing (two prefills under
  ``patch_model``), to show what the shared prefix is worth.

``× base`` in the results is the throughput ratio (samples/s of the row over the
baseline's); ``note`` gives samples/s. Peak memory is measured on CUDA (the harness's
convention); on CPU the note states the eager baseline's attention-weights memory per
forward, ``L·H·S²·4`` bytes, which the sweep never materialises.

Models: on CPU a tiny-but-long LLaVA (4 layers of width 128, 8 heads, a 24×24 image =
576 image tokens, S ≈ 690); on a GPU a random-initialised LLaVA with a 7B-shaped LLM
(Qwen2-7B: 28 layers, width 3584, 28 query / 4 KV heads, MLP 18944) in bfloat16 and a
336-pixel image (576 tokens). The tiny builder's vision tower is small in both: the
comparison is about the LLM's attention, which is where the two differ.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

from _benchlib import CUDA, SMALL

from vgkernels.sweep.datasets import Sample
from vgkernels.sweep.metrics import sample_metrics
from vgkernels.integrations.loaders import load_model
from vgkernels.sweep.runner import Encoder, MapRunner

if CUDA and not SMALL:
    MODEL = ("tiny-llava:image_size=336,hidden_size=3584,num_layers=28,num_heads=28,num_kv_heads=4,"
             "intermediate_size=18944")
    N_SAMPLES, BATCH, ROUNDS = 32, 16, 3
else:
    MODEL = "tiny-llava:image_size=336,hidden_size=128,num_layers=4,num_heads=8,num_kv_heads=2,intermediate_size=256"
    N_SAMPLES, BATCH, ROUNDS = 8, 8, 2

QUESTIONS = ["Is there a bright rectangle in the image?", "Where is the square?",
             "Does this image show a lesion in the upper left region of the scan?", "Size of the object?"]
GROUP = f"sweep {N_SAMPLES} samples, {'7B-shaped LLaVA' if CUDA and not SMALL else 'tiny-but-long LLaVA'}, N=576"

_STATE = {}


def _setup():
    if _STATE:
        return _STATE
    from vgkernels.tiny import test_image

    dev = "cuda" if CUDA else "cpu"
    ctx = torch.device(dev) if CUDA else None
    with (ctx or _null()):
        bundle = load_model(MODEL, device=dev)
        eager = load_model(MODEL, device=dev, attn_implementation="eager")
    tmp = tempfile.mkdtemp(prefix="bench_sweep_")
    samples = []
    for i in range(N_SAMPLES):
        p = os.path.join(tmp, f"{i}.png")
        test_image(336, 336, seed=i).save(p)
        samples.append(Sample(i, str(i), p, QUESTIONS[i % len(QUESTIONS)], [[40.0 + i, 60.0, 120.0, 90.0]]))
    items = [Encoder(bundle)(s) for s in samples]
    assert all(it.error is None for it in items), [it.error for it in items if it.error]
    _STATE.update(bundle=bundle, eager=eager, items=items)
    return _STATE


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _metrics_of(maps_q, maps_ref, n, mask):
    return sample_metrics(maps_q[..., :n], maps_ref[..., :n], mask)


def _sweep_fn(st, prefix_sharing: bool):
    from vgkernels.layout import box_mask

    runner = MapRunner(st["bundle"], prefix_sharing=prefix_sharing)
    items = st["items"]

    def fn():
        out = []
        for i in range(0, len(items), BATCH):
            grp = items[i: i + BATCH]
            mb = runner.run(grp)
            for b, it in enumerate(grp):
                lay = mb.layouts[b]
                mask = box_mask(lay, it.sample.boxes).to(mb.maps_q.device)
                out.append(_metrics_of(mb.maps_q[b], mb.maps_ref[b], lay.N, mask))
        return out

    return fn


def _eager_fn(st):
    from vgkernels.layout import grid_layout, box_mask

    model = st["eager"].model
    tok = model.config.image_token_index
    dev = st["eager"].device
    dt = next(model.parameters()).dtype

    def maps(ids, pixels):
        ids = ids[None].to(dev)
        px = {k: v.to(dev, dt) if v.is_floating_point() else v.to(dev) for k, v in pixels.items()}
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **px, output_attentions=True, logits_to_keep=1)
        pos = (ids[0] == tok).nonzero()[:, 0]
        ks, n = int(pos[0]), len(pos)
        return torch.stack([a[0, :, -1, ks: ks + n].float() for a in out.attentions]), n

    def fn():
        out = []
        with torch.inference_mode():
            for it in st["items"]:
                mq, n = maps(it.q["input_ids"], it.pixels)
                mr, _ = maps(it.r["input_ids"], it.pixels)
                g = int(n ** 0.5)
                mask = box_mask(grid_layout((g, g), it.image_size), it.sample.boxes).to(mq.device)
                out.append(_metrics_of(mq, mr, n, mask))
        return out

    return fn


@pytest.mark.parametrize("provider", ["eager-output_attentions-b1", f"sweep-b{BATCH}", f"sweep-full-b{BATCH}"])
def test_sweep_throughput(measure, benchmark, provider):
    st = _setup()
    if provider.startswith("eager"):
        fn, base = _eager_fn(st), True
    else:
        fn, base = _sweep_fn(st, prefix_sharing=not provider.startswith("sweep-full")), False
    L, H = st["bundle"].n_layers_heads()
    S = int(st["items"][0].q["input_ids"].numel())
    ms = measure(fn, provider=provider, group=GROUP, shape=f"{N_SAMPLES} samples L{L} H{H} S~{S} N576",
                 baseline=base, rounds=ROUNDS)
    note = f"{N_SAMPLES / (ms * 1e-3):.2f} samples/s"
    if provider.startswith("eager") and not CUDA:
        note += f"; eager attention weights {L * H * S * S * 4 / 2**20:.0f} MiB per forward"
    benchmark.extra_info["note"] = note
