"""Batched capture of last-token maps for a question prompt and a reference prompt.

For one sample the question prompt and the reference prompt tokenise to
``prefix + suffix_q`` and ``prefix + suffix_r``, where the shared ``prefix`` runs
through the image's last token (chat preamble and image tokens). :class:`MapRunner`
with ``prefix_sharing=True``:

1. runs the prefix of a batch once, with the image, under :func:`vgkernels.patch_model`
   (which reports each sample's image layout: span and token cells), keeping the KV
   cache;
2. runs the question suffixes on that cache (right-padded, so every real token keeps
   its unpadded position) and captures, in every captured layer, the attention of each
   sample's last real suffix token over its image span;
3. removes the suffix from the cache and does the same for the reference suffixes.

Steps 2 and 3 run under the one attention takeover
(:mod:`vgkernels.integrations.takeover`) with an explicit plan: every layer's output
still comes from the model's own attention, and at the captured layers the captured row
is recomputed alone by the vgkernels kernel (one query row over the cached keys), which
returns its probabilities over the image span. The cache prefix holds no padding
(batches are split so all prefixes in a call have the same length), so causality alone
decides which keys the row attends, exactly as in an unpadded batch-1 run. The maps therefore equal those of full separate runs up to
floating-point rounding; ``tests/test_sweep_run.py`` holds them to eager
``output_attentions`` runs and to ``patch_model`` full runs.

``prefix_sharing=False`` runs both full prompts under ``patch_model(capture=...)``
instead (two prefills per sample); it is the check of the shared path and the fallback
for chat formats that put the image after the text.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..constants import ANSWER_LINE as DEFAULT_ANSWER_SUFFIX
from ..data import ImageReadError, read_image
from ..constants import REFERENCE_PROMPT as DEFAULT_REFERENCE

# Keys of a processor's output aligned with input_ids, token for token.
_ID_ALIGNED = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def with_suffix(text: str, suffix: Optional[str], sep: str = "\n") -> str:
    """``text``, then ``sep`` and ``suffix`` when there is one (``sep`` is ``" "`` in the
    authors' profile, :data:`vgkernels.paper.SEPARATOR`)."""
    return f"{text}{sep}{suffix}" if suffix else text


@dataclass
class Encoded:
    """One sample, tokenised for both prompts (done in a DataLoader worker).

    ``q``/``r``: id-aligned 1-D tensors of the question / reference prompt;
    ``P``: length of their common prefix, which contains the whole image;
    ``pixels``: the processor's image tensors for this one image (leading dim 1, or a
    list); ``error``: why the sample could not be prepared (it then goes to rejects).
    """

    sample: object
    q: dict = field(default_factory=dict)
    r: dict = field(default_factory=dict)
    P: int = 0
    pixels: dict = field(default_factory=dict)
    image_size: Optional[tuple] = None
    error: Optional[str] = None
    error_kind: Optional[str] = None  # datasets.REJECT_KINDS


class Encoder:
    """Decode an image and tokenise both prompts (picklable; runs in workers)."""

    def __init__(self, bundle, reference: str = DEFAULT_REFERENCE, answer_suffix: Optional[str] = DEFAULT_ANSWER_SUFFIX,
                 prefix_sharing: bool = True, sep: str = "\n"):
        self.processor = bundle.processor
        self.family = type(bundle.shim)  # a class: process() and chat_text() are static
        self.sep = sep
        self.ref_text = self.family.chat_text(self.processor, with_suffix(reference, answer_suffix, sep))
        self.answer_suffix = answer_suffix
        self.prefix_sharing = prefix_sharing
        self.image_token_ids = bundle.shim.image_token_ids()

    def __call__(self, sample) -> Encoded:
        try:
            image = read_image(sample.image)
        except ImageReadError as e:
            return Encoded(sample, error=str(e), error_kind=e.kind)
        try:
            question = self.family.chat_text(self.processor, with_suffix(sample.question, self.answer_suffix, self.sep))
            eq = self.family.process(self.processor, [image], [question])
            er = self.family.process(self.processor, [image], [self.ref_text])
        except Exception as e:  # a processor rejecting an image must not stop the sweep
            return Encoded(sample, error=f"processor failed: {type(e).__name__}: {e}", error_kind="processor failed")
        q = {k: v[0] for k, v in eq.items() if k in _ID_ALIGNED and isinstance(v, torch.Tensor)}
        r = {k: v[0] for k, v in er.items() if k in _ID_ALIGNED and isinstance(v, torch.Tensor)}
        pixels = {k: v for k, v in eq.items() if k not in _ID_ALIGNED}
        qi, ri = q["input_ids"], r["input_ids"]
        img_pos = torch.isin(qi, torch.tensor(sorted(self.image_token_ids), dtype=qi.dtype)).nonzero()
        if img_pos.numel() == 0:
            return Encoded(sample, error="no image token in the tokenised prompt", error_kind="processor failed")
        # The shared prefix ends with the image: a fixed cut (rather than the longest
        # common prefix, which depends on the question's first characters) keeps the
        # prefix length equal across samples with equal image token counts.
        P = int(img_pos[-1, 0]) + 1
        if self.prefix_sharing and (P >= min(qi.numel(), ri.numel()) or not torch.equal(qi[:P], ri[:P])):
            return Encoded(sample, error=("the question and reference prompts differ before the end of the "
                                          "image; use --no-prefix-sharing"), error_kind="processor failed")
        return Encoded(sample, q, r, P, pixels, tuple(image.size))


def collate_pixels(items: Sequence[dict]) -> dict:
    """Concatenate per-image processor outputs along dim 0, zero-padding ragged dims
    (LLaVA-NeXT's patch counts); lists are concatenated."""
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            shape = [max(v.shape[d] for v in vals) for d in range(vals[0].dim())]
            if all(list(v.shape[1:]) == shape[1:] for v in vals):
                out[key] = torch.cat(vals, dim=0)
            else:
                padded = []
                for v in vals:
                    p = v.new_zeros([v.shape[0]] + shape[1:])
                    p[tuple(slice(0, s) for s in v.shape)] = v
                    padded.append(p)
                out[key] = torch.cat(padded, dim=0)
        elif isinstance(vals[0], (list, tuple)):
            out[key] = [x for v in vals for x in v]
        else:
            out[key] = vals[0]
    return out


@dataclass
class MapBatch:
    """``maps_q``, ``maps_ref``: ``(B, L, H, Nmax)`` float32, NaN beyond each sample's
    ``layouts[b].N``; ``layers``: the captured layer indices."""

    maps_q: torch.Tensor
    maps_ref: torch.Tensor
    layouts: list
    layers: list


# ----------------------------------------------------------------------------- runner


def _raise_skipped(skipped, samples=None):
    """``vg.skipped`` as an error: per-sample reasons (several images in a sample, ...)
    are the samples' problem (:class:`~.datasets.SampleError`: rejected, the sweep goes
    on); a reason for the whole call (sample None) is not, and stops the sweep."""
    from .datasets import SampleError

    whole = [r for b, r in skipped if b is None]
    if whole:
        raise RuntimeError(f"run: capture did not apply to the call: {'; '.join(whole)}")
    bad = sorted({int(b) for b, _ in skipped} | set(samples or ()))
    reasons = "; ".join(f"sample {b}: {r}" for b, r in skipped)
    raise SampleError(f"capture did not apply: {reasons}", "capture failed", bad)



def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class MapRunner:
    """Question and reference maps for a batch of :class:`Encoded` samples.

    ``layers``: decoder layer indices to capture (None = all). ``backend`` is passed
    to :func:`vgkernels.patch_model`.
    """

    def __init__(self, bundle, *, layers: Optional[Sequence[int]] = None, prefix_sharing: bool = True,
                 backend: str = "auto"):
        self.bundle = bundle
        L, H = bundle.n_layers_heads()
        self.L_total, self.H = L, H
        self.layers = list(range(L)) if layers is None else [int(l) for l in layers]
        bad = [l for l in self.layers if not 0 <= l < L]
        if bad:
            raise ValueError(f"layers: {bad} outside the model's 0..{L - 1}")
        self.prefix_sharing = prefix_sharing
        from .metrics import cpu_safe_backend

        self.backend = cpu_safe_backend(backend, bundle.device)
        self._logits_kw = {"logits_to_keep": 1} if _accepts(bundle.model.forward, "logits_to_keep") else {}

    # -- helpers
    def _device_inputs(self, d: dict) -> dict:
        dev = self.bundle.device
        dt = next(self.bundle.model.parameters()).dtype
        out = {}
        for k, v in d.items():
            if isinstance(v, torch.Tensor):
                v = v.to(dev)
                if v.is_floating_point():
                    v = v.to(dt)
            out[k] = v
        return out

    def _patch(self, capture, items):
        from .. import patch_model

        # image_sizes: the shim maps token cells back to the pixels of the images as
        # loaded, so that boxes in original pixels give the right mask.
        return patch_model(self.bundle.model, capture=capture, backend=self.backend,
                           processor=self.bundle.processor, image_sizes=[it.image_size for it in items])

    @torch.inference_mode()
    def run(self, items: Sequence[Encoded]) -> MapBatch:
        if not items:
            raise ValueError("run: expected at least one sample")
        if self.prefix_sharing:
            return self._run_shared(items)
        return self._run_full(items)

    # -- two full prefills under patch_model
    def _full_batch(self, items, key: str):
        seqs = [getattr(it, key) for it in items]
        S = max(s["input_ids"].numel() for s in seqs)
        pad_id = getattr(getattr(self.bundle.processor, "tokenizer", None), "pad_token_id", 0) or 0
        batch = {}
        for name in seqs[0]:
            fill = pad_id if name == "input_ids" else 0
            t = torch.full((len(seqs), S), fill, dtype=seqs[0][name].dtype)
            for b, s in enumerate(seqs):
                t[b, : s[name].numel()] = s[name]  # right padding keeps real positions 0..n-1
            batch[name] = t
        batch["attention_mask"] = torch.zeros(len(seqs), S, dtype=torch.long)
        for b, s in enumerate(seqs):
            batch["attention_mask"][b, : s["input_ids"].numel()] = 1
        batch.update(collate_pixels([it.pixels for it in items]))
        return self._device_inputs(batch)

    def _run_full(self, items) -> MapBatch:
        res = []
        for key in ("q", "r"):
            with self._patch(self.layers, items) as vg:
                self.bundle.model(**self._full_batch(items, key), **self._logits_kw)
            if vg.skipped:
                _raise_skipped(vg.skipped)
            res.append((vg.maps.float(), list(vg.layout)))
        (mq, lay), (mr, _) = res
        n = max(mq.shape[-1], mr.shape[-1])
        pad = lambda m: torch.nn.functional.pad(m, (0, n - m.shape[-1]), value=float("nan"))
        return MapBatch(pad(mq), pad(mr), lay, list(self.layers))

    # -- one prefix, two suffixes
    def _run_shared(self, items) -> MapBatch:
        from vgkernels.integrations.continuation import output_cache

        Ps = {it.P for it in items}
        if len(Ps) != 1:
            raise ValueError(f"run: prefix sharing needs equal prefix lengths in a batch, got {sorted(Ps)}")
        P = Ps.pop()
        prefix = {k: torch.stack([it.q[k][:P] for it in items]) for k in items[0].q}
        prefix["attention_mask"] = torch.ones_like(prefix["input_ids"])
        prefix.update(collate_pixels([it.pixels for it in items]))
        prefix = self._device_inputs(prefix)
        # The prefix call needs the patch only for the layout (it sees the image):
        # capture=None leaves every layer on the model's own attention.
        with self._patch(None, items) as vg:
            out = self.bundle.model(**prefix, use_cache=True, **self._logits_kw)
        layouts = list(vg.layout)
        missing = [b for b, l in enumerate(layouts) if l is None]
        if missing:
            _raise_skipped(vg.skipped or [(b, "no single image span") for b in missing], missing)
        cache = output_cache(out)
        Pc = cache.get_seq_length()
        maps = []
        for key in ("q", "r"):
            suffixes = [getattr(it, key)["input_ids"][P:] for it in items]
            maps.append(self._suffix(cache, Pc, suffixes, layouts))
        return MapBatch(maps[0], maps[1], layouts, list(self.layers))

    def _suffix(self, cache, Pc: int, suffixes, layouts):
        """Run right-padded ``suffixes`` on the prefix's cache and capture each sample's last
        real suffix row; the cache is cut back to ``Pc`` columns afterwards."""
        from vgkernels.integrations.continuation import cache_keyword, taken_over
        from vgkernels.integrations.takeover import build_plan

        shim = self.bundle.shim
        B = len(suffixes)
        k = max(s.numel() for s in suffixes)
        dev = self.bundle.device
        pad_id = getattr(getattr(self.bundle.processor, "tokenizer", None), "pad_token_id", 0) or 0
        ids = torch.full((B, k), pad_id, dtype=torch.long)
        mask = torch.ones(B, Pc + k, dtype=torch.long)
        for b, s in enumerate(suffixes):
            ids[b, : s.numel()] = s
            mask[b, Pc + s.numel():] = 0
        target = shim.llm()
        kw = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "use_cache": True,
              cache_keyword(target.forward): cache}
        pos = shim.suffix_positions(Pc, k, B, dev)
        if pos is not None:
            kw["position_ids"] = pos
        if self._logits_kw and _accepts(target.forward, "logits_to_keep"):
            kw.update(self._logits_kw)
        rows = [Pc + s.numel() - 1 for s in suffixes]
        slots = {l: i for i, l in enumerate(self.layers)}
        with taken_over(shim.layers(), self.layers, backend=self.backend) as tk:
            tk.plan = plan = build_plan(sq=k, sk=Pc + k, layouts=layouts, device=dev, capture_slots=slots, rows=rows)
            target(**kw)
        cache.crop(-k)
        if cache.get_seq_length() != Pc:
            raise RuntimeError(f"KV cache holds {cache.get_seq_length()} tokens after removing the suffix, "
                               f"expected the prefix's {Pc}")
        if plan.capture.maps is None:
            raise RuntimeError("the suffix pass ran no captured layer")
        return plan.capture.maps
