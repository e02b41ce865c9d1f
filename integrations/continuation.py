"""Runs over a KV cache: prefix once, suffix passes, greedy decoding.

The pipelines share most of their work between prompts that differ only after the image
(VGRefine's question, reference and knockout passes; the sweep's question and reference
prompts). Inside the LLM every sample is a sequence of ``T`` cache columns; ``s_b`` is
the first column after sample ``b``'s image. Because attention is causal, two prompts
that agree on columns ``< s_b`` have the same keys and values there at every layer, and
a knockout from layer ``ℓ₀`` on leaves every column unchanged below ``ℓ₀``. So after
one prefix the pipelines run only *suffixes* through the text model (never the vision
tower), with the helpers here:

- :class:`TextStack`: the text model, its layers, embeddings and LM head (found by the
  family shim);
- :func:`run_text`: one forward of the text model over ``inputs_embeds`` at explicit
  positions, on top of a cache, with a 2-D key mask (holes allowed: a suffix may skip
  columns of the cache), which every transformers version and every attention
  implementation accepts;
- :func:`cache_snapshot` / :func:`cache_restore`: drop what a suffix appended;
- :func:`skip_layers`: layers below ``ℓ₀`` return hidden states an earlier pass
  computed for the same rows;
- :func:`taken_over`: the patched layers of a suffix pass, under the one takeover of
  :mod:`.takeover` with an explicit :class:`~.takeover.CallPlan`;
- :func:`decode` (greedy by default, or :class:`Sampling` as ``generate`` samples).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .takeover import Takeover


# ----------------------------------------------------------------------------- model parts


@dataclass
class TextStack:
    """The LLM inside a vision-language model.

    ``decoder`` is the transformers text model (embeddings, decoder layers, final norm),
    ``lm_head`` maps its output to logits, ``layers`` are its decoder layers.
    """

    decoder: nn.Module
    lm_head: nn.Module
    layers: nn.ModuleList
    embed: nn.Module
    accepts_cache_position: bool
    cache_kw: str = "past_key_values"
    #: length of the tuple a decoder layer returns (transformers 4.57's Qwen2-VL), 0 for a tensor;
    #: learnt from the first prefill.
    layer_tuple_len: Optional[int] = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)



def make_stack(decoder: nn.Module, lm_head: nn.Module, what: str) -> TextStack:
    """A :class:`TextStack` from a text model (owning ``layers`` and ``embed_tokens``) and
    its LM head; ``ValueError`` naming ``what`` when the parts are missing."""
    layers = getattr(decoder, "layers", None)
    embed = getattr(decoder, "embed_tokens", None)
    if decoder is None or lm_head is None or not isinstance(layers, nn.ModuleList) or embed is None:
        raise ValueError(f"cannot find the text model of {what}: expected a decoder with `.layers` and "
                         "`.embed_tokens`, and an `lm_head`")
    params = inspect.signature(decoder.forward).parameters
    return TextStack(decoder, lm_head, layers, embed, "cache_position" in params, cache_keyword(decoder.forward))


def cache_keyword(fn) -> str:
    """The keyword a forward takes its KV cache by: ``cache`` (transformers >= 5.24) or
    ``past_key_values``."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def output_cache(out):
    """The KV cache a model output carries, whatever the field is called."""
    for name in ("cache", "past_key_values"):
        c = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if c is not None:
            return c
    return None


# ----------------------------------------------------------------------------- KV cache


def cache_layers(cache) -> list:
    """The per-layer ``DynamicLayer`` objects (``.keys``/``.values`` ``(B, Hkv, S, D)``)."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(l, "keys") for l in layers):
        raise ValueError(
            f"VGRefine needs a transformers DynamicCache with per-layer `.keys`/`.values` (transformers >= 4.57), "
            f"got {type(cache).__name__}"
        )
    return layers


def cache_snapshot(cache) -> list:
    """References to every layer's keys and values. ``DynamicLayer.update`` concatenates into
    new tensors and never writes in place, so these stay valid whatever runs next."""
    return [(l.keys, l.values) for l in cache_layers(cache)]


def cache_restore(cache, snap: list, *, length: Optional[int] = None, from_layer: int = 0,
                  to_layer: Optional[int] = None) -> None:
    """Put ``snap`` back into ``cache`` for layers ``from_layer <= i < to_layer``, cut to
    ``length`` columns."""
    for i, (layer, (k, v)) in enumerate(zip(cache_layers(cache), snap)):
        if i < from_layer or (to_layer is not None and i >= to_layer):
            continue
        if length is not None:
            k, v = k[..., :length, :], v[..., :length, :]
        layer.keys, layer.values = k, v


# ----------------------------------------------------------------------------- running


@contextlib.contextmanager
def taken_over(layers: Sequence, indices: Sequence[int], *, execution: str = "composed", backend: str = "auto"):
    """The :class:`~.takeover.Takeover` of ``layers[indices]`` for the duration of the block
    (nothing is patched when ``indices`` is empty); set ``tk.plan`` before each call."""
    tk = Takeover(layers, indices, execution=execution, backend=backend)
    if not tk.indices:
        yield tk
        return
    tk.install()
    try:
        yield tk
    finally:
        tk.remove()


@contextlib.contextmanager
def skip_layers(stack: TextStack, upto: int, hidden: Optional[torch.Tensor]):
    """Layers ``< upto`` return ``hidden`` (the input of layer ``upto`` that an earlier pass
    computed for these very rows) without touching the cache."""
    if upto <= 0:
        yield
        return

    n = stack.layer_tuple_len or 0
    out = (hidden,) + (None,) * (n - 1) if n else hidden

    def skip(hidden_states, *args, **kwargs):
        return out

    saved = []
    try:
        for layer in stack.layers[:upto]:
            saved.append(layer.__dict__.get("forward"))
            layer.forward = skip
        yield
    finally:
        for layer, f in zip(stack.layers[:upto], saved):
            if f is None:
                del layer.forward
            else:
                layer.forward = f


def run_text(stack: TextStack, embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
             cache, *, first_column: Optional[int] = None) -> torch.Tensor:
    """One forward of the text model over ``embeds (B, S, d)`` on top of ``cache``; returns
    the normed last hidden states ``(B, S, d)``. ``attention_mask`` is ``(B, Sk)`` (True or 1
    = a key the rows may see, causality on top); ``first_column`` is the column of row 0
    (4.57's ``cache_position``)."""
    kw = dict(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask.long(),
              use_cache=True)
    kw[stack.cache_kw] = cache
    if stack.accepts_cache_position and first_column is not None:
        kw["cache_position"] = torch.arange(first_column, first_column + embeds.shape[1], device=embeds.device)
    out = stack.decoder(**kw)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def logits_at(stack: TextStack, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``lm_head`` of ``hidden[b, rows[b]]`` -> ``(B, V)`` float32."""
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), rows]
    return stack.lm_head(h).float()


def shift_positions(pos: torch.Tensor, cols: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Positions ``pos[..., b, cols[b]] + steps`` as ``(..., B, len(steps))`` (any leading
    M-RoPE axes: a text token after the image moves by one on every axis)."""
    B = pos.shape[-2]
    base = pos[..., torch.arange(B, device=pos.device), cols]  # (..., B)
    return base[..., None] + steps.to(pos.device)


@dataclass(frozen=True)
class Sampling:
    """How :func:`decode` picks each token, with transformers ``generate``'s semantics and
    order: repetition penalty (a logit of an id already in the history is divided by
    ``repetition_penalty`` when positive, multiplied when negative), then — when
    ``do_sample`` — temperature, top-k, top-p, and a draw from the softmax with a
    ``torch.Generator`` seeded with ``seed`` at the start of each :func:`decode` (so the
    same seed gives the same draws as ``torch.manual_seed(seed)`` before ``generate``,
    and every VGRefine setting decodes with the same stream). Without ``do_sample`` the
    token is the argmax. Settings not given are off (no defaults are read from the
    model's ``generation_config``)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0 (0: off), got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a value in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty: expected > 0, got {self.repetition_penalty!r}")

    def penalise(self, logits: torch.Tensor, seen: Optional[torch.Tensor]) -> torch.Tensor:
        if seen is None or self.repetition_penalty == 1.0:
            return logits
        hit = torch.where(logits < 0, logits * self.repetition_penalty, logits / self.repetition_penalty)
        return torch.where(seen, hit, logits)

    def choose(self, logits: torch.Tensor, seen: Optional[torch.Tensor], generator) -> torch.Tensor:
        """The next token ``(B,)`` from float32 logits ``(B, V)``."""
        x = self.penalise(logits, seen)
        if not self.do_sample:
            return x.argmax(-1)
        x = x / self.temperature
        if self.top_k:
            kth = torch.topk(x, min(self.top_k, x.shape[-1]), dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            srt, order = torch.sort(x, dim=-1)  # ascending: drop the low tail holding <= 1 - top_p
            drop = srt.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[..., -1] = False
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(x.softmax(-1), 1, generator=generator)[:, 0]

    def generator(self, device) -> Optional[torch.Generator]:
        if not self.do_sample or self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(int(self.seed))


GREEDY = Sampling()


def decode(stack: TextStack, first_logits: torch.Tensor, cache, key_mask: torch.Tensor, last_pos: torch.Tensor, *,
           max_new_tokens: int, eos: Sequence[int], pad_id: int, sampling: Sampling = GREEDY,
           history: Optional[torch.Tensor] = None, on_step: Optional[Callable] = None):
    """Decode from the logits of the last prompt row (greedy, or as ``sampling`` says).

    ``key_mask (B, T)`` bool over the cached columns, ``last_pos (..., B, 1)`` the position of
    each sample's last prompt token, ``history (B, T0)`` ids the repetition penalty counts
    besides the generated ones (negative entries are ignored: padding, the image sentinel) (``generate`` counts its ``input_ids``: the prompt for HF
    VLMs, nothing for the LLaVA codebase, which generates from embeddings). Returns
    ``(tokens (B, G) long, logits list of (B, V))`` (the model's logits, before the
    penalty); after a sample's EOS its tokens are ``pad_id``.
    """
    B = first_logits.shape[0]
    dev = first_logits.device
    eos_t = torch.tensor(list(eos), device=dev) if eos else None
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros_like(first_logits, dtype=torch.bool)
        if history is not None and history.numel():
            h = history.to(dev)  # negative ids (the image sentinel) are not tokens
            hits = torch.zeros_like(first_logits).scatter_add_(1, h.clamp_min(0), (h >= 0).to(first_logits.dtype))
            seen = hits > 0
    gen = sampling.generator(dev)
    toks, all_logits = [], []
    logits = first_logits
    mask = key_mask.long()
    for g in range(max_new_tokens):
        all_logits.append(logits)
        tok = sampling.choose(logits, seen, gen)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        toks.append(tok)
        if seen is not None:
            seen[torch.arange(B, device=dev), tok] = True
        if eos_t is not None:
            done = done | torch.isin(tok, eos_t)
        if g == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)
        emb = stack.embed(tok[:, None])
        pos = last_pos + (g + 1)
        hidden = run_text(stack, emb, pos, mask, cache, first_column=mask.shape[1] - 1)
        if on_step is not None:
            on_step()
        logits = stack.lm_head(hidden[:, -1]).float()
    return torch.stack(toks, dim=1), all_logits


def greedy_decode(stack: TextStack, first_logits: torch.Tensor, cache, key_mask: torch.Tensor,
                  last_pos: torch.Tensor, **kw):
    """:func:`decode` with greedy choice (kept for callers of the earlier name)."""
    return decode(stack, first_logits, cache, key_mask, last_pos, sampling=GREEDY, **kw)
