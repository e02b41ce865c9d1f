"""Text-model machinery behind :class:`vgkernels.VGRefine`: suffix passes over a KV cache.

VGRefine needs three computations that share almost all their work (SPEC §4-§5):

1. the question prompt ``[prefix | image | question]`` (its prefill is also the prefill
   of a plain ``generate``),
2. the reference prompt ``[prefix | image | reference]``,
3. the question prompt again with a knockout at layers ``ℓ ∈ layers`` on the question rows.

Inside the LLM every sample is a sequence of ``T`` columns (after any image-feature
splice); ``s_b`` is the first column after sample ``b``'s image and ``last_b`` its last
real prompt column. Because attention is causal, (2) equals (1) on columns ``< s_b`` and
(3) equals (1) on columns ``< s_b`` at every layer and on *all* columns below the first
knockout layer ``ℓ₀``. So after (1) this module runs only *suffixes* through the text
model (never the vision tower):

- the reference rows, appended after column ``T`` with a key mask that hides columns
  ``[s_b, T)`` (the question) from them, at positions continuing those of column
  ``s_b``; their cache entries are dropped afterwards (``VGRefine`` can also append them
  to the prefill itself, with a 4-D mask built by :func:`additive_mask`);
- the question rows ``[s_min, T)`` at layers ``>= ℓ₀`` only: layers below are replaced by
  the hidden states that pass (1) produced at the input of ``ℓ₀`` (kept by a forward
  pre-hook), their cache entries are pass (1)'s, and the cache of layers ``>= ℓ₀`` is
  cropped to ``s_min`` before the rows are recomputed.

Suffix passes call the text model (``LlamaModel``, ``Qwen2Model``, ``Qwen2VLTextModel``,
...) with ``inputs_embeds``, explicit ``position_ids`` and a 4-D additive mask, which
every transformers version (4.57, 5.x) passes to the attention function unchanged. The
attention function itself is switched, for the duration of a suffix pass only, to one
registered here with ``transformers.AttentionInterface``: plain SDPA over the given
mask, plus at the chosen layers the captured row (the last real query row's
probabilities over the image, float32) and the knockout (``vgkernels.attention`` with a
:class:`vgkernels.Knockout`). In *passthrough* mode the same function serves pass (1):
it calls the model's own attention function with the model's own mask and only adds the
captured rows, ``O(H·S·D)`` per layer. Decode steps use the model's own attention.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ._types import Capture, Knockout
from .ops import attention as vg_attention

ATTN_NAME = "vgkernels_refine"


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
    #: length of the tuple a decoder layer returns (transformers 4.57's Qwen2-VL), 0 for a tensor;
    #: learnt from the first prefill.
    layer_tuple_len: Optional[int] = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def attn_configs(self) -> list:
        seen, out = set(), []
        for layer in self.layers:
            cfg = getattr(getattr(layer, "self_attn", None), "config", None)
            if cfg is not None and id(cfg) not in seen:
                seen.add(id(cfg))
                out.append(cfg)
        if not out:
            out.append(self.decoder.config)
        return out


def text_stack(model: nn.Module) -> TextStack:
    """Find the text model and LM head of a supported vision-language model.

    Families (SPEC §6): HF LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL (``model.model.
    language_model``), LLaVA-codebase splices (``model.model`` is the decoder and
    ``model.lm_head`` the head) and VILA (``model.llm``). Raises ``ValueError`` otherwise.
    """
    llm = getattr(model, "llm", None)
    if isinstance(llm, nn.Module) and hasattr(llm, "lm_head"):
        decoder, head = llm.model, llm.lm_head
    else:
        inner = getattr(model, "model", None)
        head = getattr(model, "lm_head", None)
        decoder = getattr(inner, "language_model", None) if inner is not None else None
        if decoder is None:
            decoder = inner
    layers = getattr(decoder, "layers", None)
    embed = getattr(decoder, "embed_tokens", None)
    if decoder is None or head is None or not isinstance(layers, nn.ModuleList) or embed is None:
        raise ValueError(
            f"VGRefine: cannot find the text model of {type(model).__name__}: expected `.model.language_model` "
            "(HF LLaVA / Qwen-VL), `.model` with `.layers` (LLaVA codebase) or `.llm.model` (VILA), and an `lm_head`"
        )
    accepts = "cache_position" in inspect.signature(decoder.forward).parameters
    return TextStack(decoder, head, layers, embed, accepts)


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


def cache_restore(cache, snap: list, *, length: Optional[int] = None, from_layer: int = 0) -> None:
    """Put ``snap`` back into ``cache`` for layers ``>= from_layer``, cut to ``length`` columns."""
    for i, (layer, (k, v)) in enumerate(zip(cache_layers(cache), snap)):
        if i < from_layer:
            continue
        if length is not None:
            k, v = k[..., :length, :], v[..., :length, :]
        layer.keys, layer.values = k, v


# ----------------------------------------------------------------------------- attention hook


@dataclass
class SuffixPlan:
    """What the attention function does during one suffix pass.

    ``key_mask (B, Sk)`` bool marks the keys each sample may attend (causality is added on
    top, bottom-right aligned: query row ``i`` sits at column ``Sk - Sq + i``).
    ``capture_layers`` / ``capture_row (B,)``: absolute column of the captured row per sample.
    ``knock_layers`` / ``knockout``: a :class:`Knockout` in absolute columns.
    ``span_start (B,)``, ``span_len (B,)``: each sample's image columns.
    ``passthrough``: a prefill that keeps the model's own attention function and mask and
    only adds the captured rows (the batch fields are filled in by a pre-hook).
    """

    key_mask: torch.Tensor
    span_start: torch.Tensor
    span_len: torch.Tensor
    capture_layers: frozenset = frozenset()
    capture_row: Optional[torch.Tensor] = None
    #: a second captured row with its own key mask (the reference rows folded into a prefill)
    extra_row: Optional[torch.Tensor] = None
    extra_key_mask: Optional[torch.Tensor] = None
    extra_maps: dict = field(default_factory=dict)
    knock_layers: frozenset = frozenset()
    knockout: Optional[Knockout] = None
    backend: str = "torch"
    passthrough: bool = False
    maps: dict = field(default_factory=dict)
    _masks: dict = field(default_factory=dict)
    _original: dict = field(default_factory=dict)

    def additive_mask(self, Sq: int, dtype: torch.dtype) -> torch.Tensor:
        """``(B, 1, Sq, Sk)``: 0 where allowed, the dtype's minimum elsewhere (never -inf, so a
        row without keys cannot turn into NaN)."""
        key = (Sq, dtype)
        if key not in self._masks:
            B, Sk = self.key_mask.shape
            dev = self.key_mask.device
            cols = torch.arange(Sk, device=dev)
            rows = torch.arange(Sk - Sq, Sk, device=dev)
            allowed = (cols[None, :] <= rows[:, None])[None] & self.key_mask[:, None, :]
            m = torch.zeros(B, 1, Sq, Sk, dtype=dtype, device=dev)
            m.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
            self._masks[key] = m
        return self._masks[key]


_ACTIVE: list[SuffixPlan] = []


def _aligned_spans(start: torch.Tensor, length: torch.Tensor, Sk: int):
    """A common span length ``Nmax`` for the batch, each sample's window moved left where
    ``start + Nmax`` would pass ``Sk``; returns ``(win_start, offset, Nmax)``."""
    nmax = int(length.max())
    win = torch.clamp(start, max=Sk - nmax)
    return win, start - win, nmax


def _capture_rows(plan: SuffixPlan, q, k, scaling: float, Sk: int, row=None, key_mask=None) -> torch.Tensor:
    """Applied probabilities of each sample's captured row over its image, ``(B, H, Nmax)``
    float32, NaN beyond a sample's ``N``. Plain softmax: no knockout in this layer.

    ``p_j = softmax_j(scale · q_row·k_j)`` over keys ``j <= row`` allowed by the key mask."""
    row = plan.capture_row if row is None else row
    key_mask = plan.key_mask if key_mask is None else key_mask
    B, H, Sq, D = q.shape
    Hkv = k.shape[1]
    rel = row - (Sk - Sq)
    qr = q[torch.arange(B, device=q.device), :, rel].float()  # (B, H, D)
    # (B, Hkv, G, D) against (B, Hkv, Sk, D): GQA without repeating K
    s = torch.einsum("bngd,bnkd->bngk", qr.view(B, Hkv, H // Hkv, D), k.float()).reshape(B, H, Sk) * scaling
    allowed = key_mask & (torch.arange(Sk, device=q.device)[None] <= row[:, None])
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return _gather_span(p, plan.span_start, plan.span_len)


def _gather_span(p: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``p (B, H, Sk)`` -> ``(B, H, Nmax)`` over ``[start_b, start_b + N_b)``, NaN padded."""
    nmax = int(length.max())
    j = torch.arange(nmax, device=p.device)
    idx = (start[:, None] + j[None]).clamp(max=p.shape[-1] - 1)
    out = torch.gather(p, 2, idx[:, None, :].expand(-1, p.shape[1], -1))
    return out.masked_fill((j[None] >= length[:, None])[:, None], float("nan"))


def _suffix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function of suffix passes (``query (B, H, Sq, D)``, ``key/value
    (B, Hkv, Sk, D)`` after the cache update). Returns ``(out (B, Sq, H, D), None)``."""
    plan = _ACTIVE[-1]
    layer = int(getattr(module, "layer_idx", -1))
    B, H, Sq, D = query.shape
    Hkv, Sk = key.shape[1], key.shape[2]
    scale = float(scaling) if scaling is not None else D ** -0.5
    if plan.passthrough:
        fn = plan._original[id(module.config)]
        out = fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if layer in plan.capture_layers:
            plan.maps[layer] = _capture_rows(plan, query, key, scale, Sk)
            if plan.extra_row is not None:
                plan.extra_maps[layer] = _capture_rows(plan, query, key, scale, Sk, plan.extra_row,
                                                       plan.extra_key_mask)
        return out
    if layer in plan.knock_layers:
        cap = None
        if layer in plan.capture_layers:
            win, off, nmax = _aligned_spans(plan.span_start, plan.span_len, Sk)
            cap = Capture(plan.capture_row, win, nmax)
        res = vg_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=True,
            softmax_scale=scale, key_padding_mask=plan.key_mask, knockout=plan.knockout, capture=cap,
            backend=plan.backend,
        )
        if cap is not None:
            out, probs = res.out, res.probs
            j = torch.arange(nmax, device=probs.device)
            idx = (off[:, None] + j[None]).clamp(max=nmax - 1)
            probs = torch.gather(probs, 2, idx[:, None, :].expand(-1, H, -1))
            plan.maps[layer] = probs.masked_fill((j[None] >= plan.span_len[:, None])[:, None], float("nan"))
            return out, None
        return res, None
    mask = plan.additive_mask(Sq, query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, enable_gqa=(H != Hkv)
    )
    if layer in plan.capture_layers:
        plan.maps[layer] = _capture_rows(plan, query, key, scale, Sk)
    return out.transpose(1, 2), None


def _original_function(name, stack: TextStack):
    """The attention function a config's ``_attn_implementation`` stands for."""
    if name in (None, "eager"):
        import sys

        attn = getattr(stack.layers[0], "self_attn", None)
        mod = sys.modules[type(attn).__module__] if attn is not None else None
        fn = getattr(mod, "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"VGRefine: cannot find eager_attention_forward for {type(attn).__name__}")
        return fn
    from transformers import AttentionInterface

    return AttentionInterface()[name]


_REGISTERED: set = set()


def _registered_name(original) -> str:
    """Our attention function under a name that also carries the original's mask function:
    the text model builds its mask through ``AttentionMaskInterface[name]``, so a prefill
    that only captures rows sees exactly the mask the model would have used."""
    base = original or "eager"
    name = f"{ATTN_NAME}[{base}]"
    if name not in _REGISTERED:
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(name, _suffix_attention)
        masks = AttentionMaskInterface._global_mapping
        AttentionMaskInterface.register(name, masks[base] if base in masks else masks["sdpa"])
        _REGISTERED.add(name)
    return name


@contextlib.contextmanager
def suffix_attention(stack: TextStack, plan: SuffixPlan):
    """Route every attention call of ``stack`` through :func:`_suffix_attention` with ``plan``."""
    cfgs = stack.attn_configs
    old = [c._attn_implementation for c in cfgs]
    for c, o in zip(cfgs, old):
        plan._original[id(c)] = _original_function(o, stack)
    names = [_registered_name(o) for o in old]
    _ACTIVE.append(plan)
    try:
        for c, n in zip(cfgs, names):
            c._attn_implementation = n
        yield plan
    finally:
        for c, o in zip(cfgs, old):
            c._attn_implementation = o
        _ACTIVE.pop()


# ----------------------------------------------------------------------------- running


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
    the normed last hidden states ``(B, S, d)``. ``attention_mask`` is 2-D ``(B, Sk)`` or a
    4-D additive mask; ``first_column`` is the column of row 0 (4.57's ``cache_position``)."""
    kw = dict(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
              past_key_values=cache, use_cache=True)
    if stack.accepts_cache_position and first_column is not None:
        kw["cache_position"] = torch.arange(first_column, first_column + embeds.shape[1], device=embeds.device)
    out = stack.decoder(**kw)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def logits_at(stack: TextStack, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``lm_head`` of ``hidden[b, rows[b]]`` -> ``(B, V)`` float32."""
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), rows]
    return stack.lm_head(h).float()


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, Sq, Sk)`` additive mask from a bool ``(B, Sq, Sk)`` (True = attend)."""
    m = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=dtype, device=allowed.device)
    return m.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def shift_positions(pos: torch.Tensor, cols: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Positions ``pos[..., b, cols[b]] + steps`` as ``(..., B, len(steps))`` (any leading
    M-RoPE axes: a text token after the image moves by one on every axis)."""
    B = pos.shape[-2]
    base = pos[..., torch.arange(B, device=pos.device), cols]  # (..., B)
    return base[..., None] + steps.to(pos.device)


def greedy_decode(stack: TextStack, first_logits: torch.Tensor, cache, key_mask: torch.Tensor,
                  last_pos: torch.Tensor, *, max_new_tokens: int, eos: Sequence[int], pad_id: int,
                  on_step: Optional[Callable] = None):
    """Greedy decoding from the logits of the last prompt row.

    ``key_mask (B, T)`` bool over the cached columns, ``last_pos (..., B, 1)`` the position of
    each sample's last prompt token. Returns ``(tokens (B, G) long, logits list of (B, V))``;
    after a sample's EOS its tokens are ``pad_id``.
    """
    B = first_logits.shape[0]
    dev = first_logits.device
    eos_t = torch.tensor(list(eos), device=dev) if eos else None
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    toks, all_logits = [], []
    logits = first_logits
    mask = key_mask.long()
    for g in range(max_new_tokens):
        all_logits.append(logits)
        tok = logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        toks.append(tok)
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
