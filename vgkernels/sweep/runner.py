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

Step 2 and 3 capture with a row-capture attention function (:class:`_RowCapture`)
installed in the LLM for the continuation call only: the output still comes from
SDPA, and the captured row is recomputed in float32 from the call's post-RoPE query and
cached keys, ``softmax(q_row · K^T · scale)`` over the causal keys ``0 .. pos(row)``.
The cache prefix holds no padding (batches are split so all prefixes in a call have the
same length), so causality alone decides which keys the row attends, exactly as in an
unpadded batch-1 run. The maps therefore equal those of full separate runs up to
floating-point rounding; ``tests/test_sweep_run.py`` holds them to eager
``output_attentions`` runs and to ``patch_model`` full runs.

``prefix_sharing=False`` runs both full prompts under ``patch_model(capture=...)``
instead (two prefills per sample); it is the check of the shared path and the fallback
for chat formats that put the image after the text.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

DEFAULT_REFERENCE = "Write a general description of the image."
# The answer-format line the authors' evaluation code appends to every question (LLaVA
# short-answer template, paper Fig. I.12); the reference prompt gets it too.
DEFAULT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."

from .models import chat_text

# Keys of a processor's output aligned with input_ids, token for token.
_ID_ALIGNED = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def with_suffix(text: str, suffix: Optional[str]) -> str:
    return f"{text}\n{suffix}" if suffix else text


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


class Encoder:
    """Decode an image and tokenise both prompts (picklable; runs in workers)."""

    def __init__(self, bundle, reference: str = DEFAULT_REFERENCE, answer_suffix: Optional[str] = DEFAULT_ANSWER_SUFFIX,
                 prefix_sharing: bool = True):
        self.processor = bundle.processor
        self.family = bundle.family
        self.ref_text = chat_text(self.processor, with_suffix(reference, answer_suffix))
        self.answer_suffix = answer_suffix
        self.prefix_sharing = prefix_sharing
        self.image_token_ids = _image_token_ids(bundle)

    def _call(self, image, text):
        if self.family.startswith("splice"):
            return dict(self.processor(images=[image], text=[text], padding_side="right"))
        return dict(self.processor(images=[image], text=[text], return_tensors="pt"))

    def __call__(self, sample) -> Encoded:
        from PIL import Image

        try:
            with Image.open(sample.image) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            return Encoded(sample, error=f"cannot read image {sample.image!r}: {e}")
        try:
            eq = self._call(image, chat_text(self.processor, with_suffix(sample.question, self.answer_suffix)))
            er = self._call(image, self.ref_text)
        except Exception as e:  # a processor rejecting an image must not stop the sweep
            return Encoded(sample, error=f"processor failed: {type(e).__name__}: {e}")
        q = {k: v[0] for k, v in eq.items() if k in _ID_ALIGNED and isinstance(v, torch.Tensor)}
        r = {k: v[0] for k, v in er.items() if k in _ID_ALIGNED and isinstance(v, torch.Tensor)}
        pixels = {k: v for k, v in eq.items() if k not in _ID_ALIGNED}
        qi, ri = q["input_ids"], r["input_ids"]
        img_pos = torch.isin(qi, torch.tensor(sorted(self.image_token_ids), dtype=qi.dtype)).nonzero()
        if img_pos.numel() == 0:
            return Encoded(sample, error="no image token in the tokenised prompt")
        # The shared prefix ends with the image: a fixed cut (rather than the longest
        # common prefix, which depends on the question's first characters) keeps the
        # prefix length equal across samples with equal image token counts.
        P = int(img_pos[-1, 0]) + 1
        if self.prefix_sharing and (P >= min(qi.numel(), ri.numel()) or not torch.equal(qi[:P], ri[:P])):
            return Encoded(sample, error=("the question and reference prompts differ before the end of the "
                                          "image; use --no-prefix-sharing"))
        return Encoded(sample, q, r, P, pixels, tuple(image.size))


def _image_token_ids(bundle) -> set:
    from ..tiny import IMAGE_TOKEN_INDEX

    if bundle.family.startswith("splice"):
        return {IMAGE_TOKEN_INDEX}
    cfg = bundle.model.config
    ids = set()
    for name in ("image_token_id", "image_token_index"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            ids.add(v)
    if not ids:
        raise ValueError(f"model config of {bundle.name!r} names no image token id")
    return ids


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


# ----------------------------------------------------------------------------- row capture

_ROWS = threading.local()
_FN_NAME = "vgkernels_sweep_rows"


def _rows_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """Captured layers: :func:`vgkernels.attention` with a :class:`~vgkernels.Capture` of
    each sample's row (one fused call gives the output and the row's probabilities);
    every other layer: transformers' SDPA, untouched."""
    st = getattr(_ROWS, "state", None)
    li = None if st is None else st.layer_ids.get(getattr(module, "layer_idx", None))
    if li is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    return st.attend(li, query, key, value, attention_mask, kwargs.get("scaling")), None


def _register_rows_fn():
    from transformers import AttentionInterface

    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        ALL_MASK_ATTENTION_FUNCTIONS.register(_FN_NAME, sdpa_mask)
    except ImportError:  # pragma: no cover - transformers without masking_utils
        pass
    AttentionInterface.register(_FN_NAME, _rows_attention)


class _RowCapture:
    """State of one continuation call: which row and span to capture per sample."""

    def __init__(self, layer_ids: dict, rows: torch.Tensor, spans: list, n_max: int, H: int, device,
                 backend: str = "auto"):
        self.layer_ids = layer_ids  # decoder layer index -> position in the maps' L axis
        self.rows = rows  # (B,) row index inside the query block
        self.spans = spans  # [(key_start, N, sequence order or None)]
        self.n_max = n_max
        self.backend = backend
        B = rows.shape[0]
        self.maps = torch.full((B, len(layer_ids), H, n_max), float("nan"), dtype=torch.float32, device=device)

    def attend(self, li: int, query, key, value, attention_mask, scaling):
        """``query (B, H, Sq, D)``, ``key, value (B, Hkv, Sk, D)`` -> ``out (B, Sq, H, D)``;
        stores the captured rows in ``maps[:, li]``."""
        from .. import Capture, attention
        from ..patching import key_padding_from_mask

        B, H, Sq, D = query.shape
        Sk = key.shape[2]
        dev = query.device
        starts = torch.tensor([ks for ks, _, _ in self.spans], dtype=torch.long)
        # The kernel's span is n_max long for every sample: shift it left where a
        # shorter image sits near the end, and read each sample's tokens at an offset.
        kstart = torch.clamp(starts, max=Sk - self.n_max)
        res = attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=True,
            softmax_scale=scaling, key_padding_mask=key_padding_from_mask(attention_mask, B, Sk),
            capture=Capture((Sk - Sq) + self.rows.to(dev), kstart.to(dev), self.n_max), backend=self.backend,
        )
        for b, (ks, n, order) in enumerate(self.spans):
            off = ks - int(kstart[b])
            # row-major token t sits at sequence offset order[t] (column-major projectors)
            idx = torch.arange(n, device=dev) if order is None else order.to(dev)
            self.maps[b, li, :, :n] = res.probs[b, :, off + idx]
        return res.out


@contextlib.contextmanager
def _capturing_rows(config, state: _RowCapture):
    """Route ``config``'s attention through :func:`_rows_attention` for one call."""
    _register_rows_fn()
    old = config._attn_implementation
    config._attn_implementation_internal = _FN_NAME
    _ROWS.state = state
    try:
        yield state
    finally:
        _ROWS.state = None
        config._attn_implementation_internal = old


# ----------------------------------------------------------------------------- runner


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
                res.append((vg.maps.float(), list(vg.layout)))
        (mq, lay), (mr, _) = res
        n = max(mq.shape[-1], mr.shape[-1])
        pad = lambda m: torch.nn.functional.pad(m, (0, n - m.shape[-1]), value=float("nan"))
        return MapBatch(pad(mq), pad(mr), lay, list(self.layers))

    # -- one prefix, two suffixes
    def _run_shared(self, items) -> MapBatch:
        Ps = {it.P for it in items}
        if len(Ps) != 1:
            raise ValueError(f"run: prefix sharing needs equal prefix lengths in a batch, got {sorted(Ps)}")
        P = Ps.pop()
        model = self.bundle.model
        prefix = {k: torch.stack([it.q[k][:P] for it in items]) for k in items[0].q}
        prefix["attention_mask"] = torch.ones_like(prefix["input_ids"])
        prefix.update(collate_pixels([it.pixels for it in items]))
        prefix = self._device_inputs(prefix)
        # The prefix call needs the patch only for the layout (it sees the image):
        # capture=None leaves every layer on the model's own attention.
        with self._patch(None, items) as vg:
            out = model(**prefix, use_cache=True, **self._logits_kw)
            layouts = list(vg.layout)
        cache = out.past_key_values
        Pc = cache.get_seq_length()
        rope_deltas = getattr(getattr(model, "model", None), "rope_deltas", None)
        if self.bundle.family.startswith("qwen") and rope_deltas is None:
            raise ValueError("qwen family: the prefix call left no rope_deltas; cannot continue from the cache")
        maps = []
        for key in ("q", "r"):
            suffixes = [getattr(it, key)["input_ids"][P:] for it in items]
            maps.append(self._suffix(cache, Pc, suffixes, layouts, rope_deltas))
        return MapBatch(maps[0], maps[1], layouts, list(self.layers))

    def _suffix(self, cache, Pc: int, suffixes, layouts, rope_deltas):
        B = len(suffixes)
        k = max(s.numel() for s in suffixes)
        dev = self.bundle.device
        pad_id = getattr(getattr(self.bundle.processor, "tokenizer", None), "pad_token_id", 0) or 0
        ids = torch.full((B, k), pad_id, dtype=torch.long)
        mask = torch.ones(B, Pc + k, dtype=torch.long)
        for b, s in enumerate(suffixes):
            ids[b, : s.numel()] = s
            mask[b, Pc + s.numel():] = 0
        rows = torch.tensor([s.numel() - 1 for s in suffixes], device=dev)
        kw = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "past_key_values": cache, "use_cache": True}
        if self.bundle.family.startswith("qwen"):
            # M-RoPE continues after the image from the positions the prefix left: the
            # same rule generate() applies to new tokens.
            pos = torch.arange(Pc, Pc + k, device=dev)[None, :] + rope_deltas.to(dev).reshape(-1, 1)
            kw["position_ids"] = pos[None].expand(3, B, k)
        target = self.bundle.llm()
        if self._logits_kw and _accepts(target.forward, "logits_to_keep"):
            kw.update(self._logits_kw)
        spans = []
        for l in layouts:
            order = l.extra.get("sequence_order")
            spans.append((int(l.key_start), int(l.N), None if order is None else torch.as_tensor(order).long()))
        n_max = max(n for _, n, _ in spans)
        state = _RowCapture({l: i for i, l in enumerate(self.layers)}, rows, spans, n_max, self.H, dev,
                            self.backend)
        with _capturing_rows(self.bundle.text_config(), state):
            target(**kw)
        cache.crop(-k)
        if cache.get_seq_length() != Pc:
            raise RuntimeError(f"KV cache holds {cache.get_seq_length()} tokens after removing the suffix, "
                               f"expected the prefix's {Pc}")
        return state.maps
