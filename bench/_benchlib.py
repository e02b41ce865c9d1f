"""What the benchmark files share (bench/ is on sys.path under pytest): the device, dtype
and shape-set switches, the model-level benchmark model and its inputs, and the row
recorder that streams every finished row to disk.

Shape sets (``SHAPE_SET``):

``full``     a GPU, ``bench/run.py`` without ``--small``: every kernel shape; the 7B-shaped
             LLaVA at batch 1 and 8.
``reduced``  a GPU with ``--small`` (``BENCH_SMALL=1``; what ``make gpu-check`` runs): the
             kernel shapes the targets are stated at (S = 1200 at B = 1 and 8, S = 8192) and
             the 7B-shaped LLaVA at batch 1.
``cpu``      no GPU: small kernel shapes in float32 and the tiny-but-long LLaVA (N = 576,
             S ≈ 630, batch 2) whose numbers issue 10's CPU targets are stated in.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# BENCH_SMALL=1 (``bench/run.py --small``) runs the reduced shape set on a GPU.
SMALL = (not CUDA) or os.environ.get("BENCH_SMALL", "0") not in ("", "0")
SHAPE_SET = "cpu" if not CUDA else ("reduced" if SMALL else "full")
# bfloat16 is what the targets are stated in; the CPU run uses float32, which CPU kernels
# handle natively (its numbers are labelled CPU and say nothing about the GPU targets).
DTYPE = torch.bfloat16 if CUDA else torch.float32

INTERPRETER_SKIP = ("Triton kernels run only in the interpreter without a GPU: the interpreter is a "
                    "correctness tool, not a speed measurement")


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def available_bytes() -> int:
    """Memory a provider may still allocate: free GPU memory, or available RAM on CPU."""
    if CUDA:
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class timing_threads:
    """The intra-op threads the CPU timings run with (one: process CPU time then measures
    work, not waiting); on CUDA a no-op. Compile anything that bakes the thread count in
    (inductor's CPU code) under the same setting, or it recompiles when timed."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        if not CUDA:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)
        return False


# ----------------------------------------------------------------------------- rows


def emit_row(nodeid: str, info: dict, rounds: Optional[int] = None) -> None:
    """Append one finished row to ``$BENCH_ROWS`` (JSON lines) the moment it is measured, so a
    run that is stopped at its time limit keeps every row it finished (``bench/run.py``)."""
    path = os.environ.get("BENCH_ROWS")
    if not path:
        return
    row = dict(info, name=nodeid, rounds=rounds)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


# ----------------------------------------------------------------------------- models

#: A random-initialised LLaVA whose LLM has the shape of a 7B model (Qwen2-7B: 28 layers,
#: width 3584, 28 query / 4 KV heads, head dim 128, MLP 18944) and a 336-pixel image
#: (24 × 24 = 576 image tokens). The vision tower of the tiny builder stays small: the
#: comparisons are about the LLM's attention.
LLAVA_7B = dict(image_size=336, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                intermediate_size=18944)
#: The tiny-but-long LLaVA of the CPU run: 8 layers of width 512, 8 query / 2 KV heads
#: (head dim 64), MLP 1536, the same 576-token image.
LLAVA_TINY_LONG = dict(image_size=336, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
                       intermediate_size=1536)

if CUDA:
    MODEL_SIZES, MODEL_LABEL, MODEL_SEQ = LLAVA_7B, "7B-shaped LLaVA", 1200
    MODEL_BATCHES = (1,) if SMALL else (1, 8)
else:
    MODEL_SIZES, MODEL_LABEL, MODEL_SEQ = LLAVA_TINY_LONG, "tiny-but-long LLaVA", 630
    MODEL_BATCHES = (2,)
N_IMAGE = (MODEL_SIZES["image_size"] // 14) ** 2

_MODELS: dict = {}


def model_spec() -> str:
    """The model as ``vgkernels sweep --model`` names it (``tiny-llava:key=value,...``)."""
    return "tiny-llava:" + ",".join(f"{k}={v}" for k, v in MODEL_SIZES.items())


def llava(attn: str = "sdpa"):
    """The benchmark model as a sweep ``ModelBundle`` (``.model``, ``.processor``), built once
    per process and attention implementation through the sweep's own loader, on the device
    (bfloat16 on CUDA, float32 on CPU), seed 0: the ``eager`` and ``sdpa`` models share weights."""
    if attn not in _MODELS:
        from vgkernels.integrations.loaders import load_model

        if CUDA:
            with torch.device("cuda"):  # initialise on the GPU: seconds instead of minutes for 7B
                _MODELS[attn] = load_model(model_spec(), device="cuda", attn_implementation=attn)
        else:
            _MODELS[attn] = load_model(model_spec(), device="cpu", attn_implementation=attn)
    return _MODELS[attn]


def n_layers(model) -> int:
    cfg = getattr(model.config, "text_config", None) or model.config
    return int(cfg.num_hidden_layers)


def chat(processor, text: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def to_device(batch, model):
    """A processor's ``BatchFeature`` on the model's device, floating tensors in its dtype."""
    p = next(model.parameters())
    return batch.to(device=p.device, dtype=p.dtype)


def images(n: int, width: int = 336, height: int = 336, seed: int = 0) -> list:
    from vgkernels.integrations.tiny import test_image

    return [test_image(width, height, seed=seed + i) for i in range(n)]


def prompt_of_length(processor, S: int, image) -> str:
    """A one-image chat prompt whose tokenised length is exactly ``S``: filler text in the
    question (the tiny models' tokenizer is byte-level, one token per character)."""
    marker = "\u0001"
    head = chat(processor, marker)
    n0 = processor(images=image, text=head, return_tensors="pt")["input_ids"].shape[1]
    if S < n0:
        raise ValueError(f"S={S} is shorter than the prompt without question ({n0} tokens)")
    filler = ("Is there a bright rectangle in the upper part of this image, near the centre? " * (S // 40 + 2))
    text = head.replace(marker, filler[: S - n0 + 1])
    got = processor(images=image, text=text, return_tensors="pt")["input_ids"].shape[1]
    if got != S:
        raise AssertionError(f"prompt has {got} tokens, wanted {S}")
    return text


def model_inputs(bundle, B: int, S: int) -> dict:
    """``B`` different images with prompts of exactly ``S`` tokens each (no padding)."""
    imgs = images(B, seed=11)
    text = prompt_of_length(bundle.processor, S, imgs[0])
    batch = bundle.processor(images=imgs, text=[text] * B, return_tensors="pt")
    return to_device(batch, bundle.model)
