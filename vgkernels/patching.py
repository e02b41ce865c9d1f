"""``patch_model``: capture and knockout inside a transformers VLM, per layer (SPEC §5).

How it works
------------
transformers picks each attention module's function from
``self.config._attn_implementation`` through its ``AttentionInterface``. ``patch_model``
gives only the chosen decoder layers' ``self_attn`` modules their own shallow copy of the
config whose implementation is the key ``"vgkernels"``, registered once with
:func:`_vg_attention`. Every other layer, the model-level config (so the mask the model
builds) and the vision tower keep what they had: sdpa, eager or flash_attention_2.
``unpatch`` puts the original config objects back: nothing else was changed, so the
outputs are bit-identical.

The mask. The model still builds its mask for its own implementation (None, a 2-D
padding mask, a 4-D bool or additive mask); the vgkernels function reads the key
padding from it — the last query row of a causal mask allows exactly the real keys —
and hands the kernel ``key_padding_mask (B, Sk)`` with ``causal=True``. Positions are
absolute cache positions (left padding included) and query row ``i`` of a call sits at
``Sk − Sq + i``: that is how a dynamic KV cache lays out prefill and decode steps, and
the kernel's bottom-right alignment. A mask function is registered under the same key
too, so that a model whose *model-wide* implementation were ``"vgkernels"`` would still
build its padding mask (transformers drops the mask silently for keys it does not know).

Per forward. A pre-hook on the decoder (the module owning ``layers``) sees the mask the
LLM receives and the cache. The **prefill** is a forward on an empty cache, or the first
forward of a ``generate`` call; the family shim (:mod:`vgkernels.integrations`) then
finds each sample's image span, the captured row is the last real token of each
sample, and the knockout rows are ``[key_start + N, last + 1)``. Decode steps reuse that.

Shapes: transformers hands ``(B, H, S, D)`` tensors; ``transpose(1, 2)`` views give the
kernel's ``(B, S, H, D)`` without a copy (the kernel takes any strides with a
contiguous last dim).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from . import ops as _ops
from ._dispatch import BACKENDS
from ._types import Capture, Knockout, KNOCKOUT_MODES
from .layout import ImageLayout

ATTN_KEY = "vgkernels"
QUERY_MODES = ("prompt", "prompt+generated")


# ----------------------------------------------------------------------------- plan


@dataclass
class KnockoutPlan:
    """Which attention to remove, and where (SPEC §5).

    layers : decoder layer indices where the knockout applies.
    keep : ``(B, N)`` bool; image token ``j`` (row-major, as ``vg.maps``) of sample ``b``
        is knocked out iff ``keep[b, j]`` is False. ``N`` is the batch's largest image
        token count; entries past a sample's own ``N`` are ignored.
    mode : ``"renorm"`` (scores of knocked keys are -inf before the softmax, the authors'
        code) or ``"zero"`` (probabilities zeroed after it, not renormalised).
    queries : ``"prompt"`` — rows from the first text token after the image up to and
        including the last prompt token (the authors' choice); ``"prompt+generated"`` —
        also every generated token.
    """

    layers: Sequence[int]
    keep: torch.Tensor
    mode: str = "renorm"
    queries: str = "prompt"

    def __post_init__(self):
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        self.layers = [_as_int("knockout.layers", l) for l in self.layers]
        if not self.layers:
            raise ValueError("knockout.layers: expected at least one layer index, got none")
        if not isinstance(self.keep, torch.Tensor) or self.keep.dim() != 2:
            got = tuple(self.keep.shape) if isinstance(self.keep, torch.Tensor) else type(self.keep).__name__
            raise ValueError(f"knockout.keep: expected a (B, N) bool tensor, got {got}")
        if self.keep.dtype != torch.bool:
            raise TypeError(f"knockout.keep: expected dtype torch.bool, got {self.keep.dtype}")
        if self.mode not in KNOCKOUT_MODES:
            raise ValueError(f"knockout.mode: expected one of {KNOCKOUT_MODES}, got {self.mode!r}")
        if self.queries not in QUERY_MODES:
            raise ValueError(f"knockout.queries: expected one of {QUERY_MODES}, got {self.queries!r}")


def _as_int(name, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, torch.Tensor)) or (isinstance(v, torch.Tensor) and v.numel() != 1):
        raise ValueError(f"{name}: expected integer layer indices, got {v!r}")
    return int(v)


# ----------------------------------------------------------------------------- registration


def _vg_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls for patched layers: ``query (B, Hq, Sq, D)``,
    ``key, value (B, Hkv, Sk, D)``; returns ``(out (B, Sq, Hq, D), None)``."""
    handle = module.__dict__.get("_vg_handle")
    if handle is None:
        raise RuntimeError(
            f"{type(module).__name__} uses the 'vgkernels' attention implementation but is not patched by "
            "vgkernels.patch_model (was its config copied after patching?)"
        )
    return handle._attend(module, query, key, value, attention_mask, scaling, dropout, kwargs)


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_KEY, _vg_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        # The sdpa mask (4-D bool, or None when nothing is masked) is one the vgkernels
        # function reads; registering it keeps padding if the key is ever used model-wide.
        AttentionMaskInterface.register(ATTN_KEY, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    except ImportError:  # pragma: no cover - transformers without masking_utils
        pass
    _REGISTERED = True


# ----------------------------------------------------------------------------- masks


def key_padding_from_mask(mask, B: int, Sk: int) -> Optional[torch.Tensor]:
    """``(B, Sk)`` bool (True = real key) from the mask a model passes to attention, or None.

    Accepts None, a 2-D ``(B, Sk)`` 0/1 padding mask (flash-attention style), a 4-D
    ``(B|1, 1, Sq, Sk)`` bool mask (True = attend) or an additive float mask (0 or a very
    negative number). For a 4-D causal mask the last query row, which may see every key,
    tells which keys are real.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"patch_model: the model passed an attention mask of type {type(mask).__name__} to a patched layer; "
            "expected None, a 2-D padding mask or a 4-D mask tensor"
        )
    if mask.dim() == 2:
        m = mask
    elif mask.dim() == 4:
        m = mask[:, 0, -1, :]
    else:
        raise ValueError(f"patch_model: expected a 2-D or 4-D attention mask, got shape {tuple(mask.shape)}")
    if m.shape[-1] != Sk:
        raise ValueError(
            f"patch_model: the attention mask covers {m.shape[-1]} keys but the layer has Sk={Sk}; patched layers "
            "need a dynamic KV cache (positions = cache slots), not a static or sliding one"
        )
    if m.dtype != torch.bool:
        if m.is_floating_point() and mask.dim() == 4:
            m = m > torch.finfo(m.dtype).min / 2
        else:
            m = m != 0
    m = m.expand(B, Sk)
    if bool(m.all()):
        return None
    return m.contiguous()


# ----------------------------------------------------------------------------- handle


@dataclass
class _Prompt:
    """What the prefill fixed for this batch, on the model's device."""

    B: int
    last_row: torch.Tensor  # (B,) int64, last real prompt token
    key_start: torch.Tensor  # (B,) int64, kernel span start (shifted so the span fits)
    n_max: int
    gather: torch.Tensor  # (B, n_max) int64: kernel-span offset of row-major token t
    valid: torch.Tensor  # (B, n_max) bool: t < N_b
    query_start: torch.Tensor  # (B,) int64, first text token after the image
    prompt_end: torch.Tensor  # (B,) int64, last real prompt token + 1
    keep: Optional[torch.Tensor] = None  # (B, n_max) bool in kernel-span order
    query_start_host: list = field(default_factory=list)
    prompt_end_host: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


class VGHandle:
    """Returned by :func:`patch_model`; a context manager.

    Attributes
    ----------
    maps : ``(B, L, H, N)`` float32 or None — the last real prompt token's attention over
        the image at each captured layer and head, taken at the latest prefill; NaN past
        each sample's ``layout[b].N``.
    layers : the captured decoder layer indices (``maps[:, i]`` is ``layers[i]``).
    layout : list of :class:`vgkernels.ImageLayout`, one per sample of the latest prefill.
    family : the shim's family name.
    calls : ``{layer: count}`` of vgkernels attention calls since patching.
    image_sizes : original ``(width, height)`` per image for the next prefill (settable);
        without them, cells are in the pixels of the image the model received (LLaVA-NeXT
        and calls passing ``image_sizes`` supply their own).
    """

    def __init__(self, model, shim, capture_layers, knockout, backend, image_sizes):
        self.model = model
        self.shim = shim
        self.family = shim.family
        self.layers = list(capture_layers)
        self.knockout = knockout
        self.backend = backend
        self.image_sizes = image_sizes
        self.maps: Optional[torch.Tensor] = None
        self.layout: list[ImageLayout] = []
        self.calls: dict[int, int] = {}
        self._cap_index = {l: i for i, l in enumerate(self.layers)}
        self._ko_layers = set(knockout.layers) if knockout is not None else set()
        self._record = None
        self._prompt: Optional[_Prompt] = None
        self._prefill = False
        self._gen_depth = 0
        self._gen_forwards = 0
        self._expected_sk = -1
        self._mask_ref = None
        self._saved_configs = []
        self._hooks = []
        self._saved_generate = []
        self._layer_of: dict[int, int] = {}
        self.active = False

    # -- context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unpatch()
        return False

    # -- install / remove
    def _install(self, n_layers: int, decoder, layers):
        _register()
        chosen = sorted(set(self.layers) | self._ko_layers)
        busy = [i for i in chosen if "_vg_handle" in layers[i].self_attn.__dict__]
        if busy:
            raise ValueError(f"patch_model: layer(s) {busy} are already patched; unpatch the other handle first")
        for idx in chosen:
            attn = layers[idx].self_attn
            cfg = attn.config
            new = copy.copy(cfg)
            # Set the storage directly: the property setter would also walk sub-configs.
            new.__dict__["_attn_implementation_internal"] = ATTN_KEY
            self._saved_configs.append((attn, cfg))
            attn.config = new
            attn.__dict__["_vg_handle"] = self
            self._layer_of[id(attn)] = idx
        self._hooks.append(self.model.register_forward_pre_hook(self._outer_pre_hook, with_kwargs=True))
        self._hooks.append(decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True))
        for owner in self.shim.generate_owners():
            if not callable(getattr(owner, "generate", None)):
                continue
            had = "generate" in owner.__dict__
            prev = owner.__dict__.get("generate")
            orig = owner.generate
            owner.__dict__["generate"] = self._wrap_generate(orig)
            self._saved_generate.append((owner, had, prev))
        self.active = True

    def unpatch(self) -> None:
        """Restore the model exactly (idempotent)."""
        for attn, cfg in reversed(self._saved_configs):
            attn.config = cfg
            attn.__dict__.pop("_vg_handle", None)
        self._saved_configs.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for owner, had, prev in reversed(self._saved_generate):
            if had:
                owner.__dict__["generate"] = prev
            else:
                owner.__dict__.pop("generate", None)
        self._saved_generate.clear()
        self._layer_of.clear()
        self._mask_ref = None
        self.active = False

    def _wrap_generate(self, orig):
        def generate(*args, **kwargs):
            if self._gen_depth == 0:
                self._gen_forwards = 0
                rec = self.shim.observe(args, kwargs)
                if rec is not None:
                    self._record = rec
            self._gen_depth += 1
            try:
                return orig(*args, **kwargs)
            finally:
                self._gen_depth -= 1

        generate.__wrapped__ = orig
        generate.__doc__ = getattr(orig, "__doc__", None)
        return generate

    # -- hooks
    def _outer_pre_hook(self, module, args, kwargs):
        rec = self.shim.observe(args, kwargs)
        if rec is not None:
            if self._gen_depth > 0 and self._record:
                # transformers 5 generate() encodes the images before the prefill and
                # forwards `mm_encoder_outputs` instead of e.g. `image_sizes`: keep what
                # the generate() call itself was given.
                for k, v in self._record.items():
                    if rec.get(k) is None:
                        rec[k] = v
            self._record = rec
        return None

    def _decoder_pre_hook(self, module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = emb if emb is not None else ids
        if x is None:
            raise ValueError("patch_model: the decoder was called with neither input_ids nor inputs_embeds")
        B, Sq = int(x.shape[0]), int(x.shape[1])
        am = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        past = _cache_length(kwargs.get("past_key_values"))
        if self._gen_depth > 0:
            prefill = self._gen_forwards == 0
            self._gen_forwards += 1
        else:
            prefill = past == 0
        if prefill and past:
            raise ValueError(
                f"patch_model: generate() started on a KV cache already holding {past} tokens; the prefill must "
                "see the whole prompt (image included)"
            )
        self._prefill = prefill
        self._expected_sk = past + Sq
        self._mask_ref = None
        if prefill:
            mask = key_padding_from_mask(am, B, Sq)
            if mask is None:
                mask = torch.ones(B, Sq, dtype=torch.bool, device=x.device)
            self._start_prompt(mask.to(x.device))
        elif self._prompt is not None and self._prompt.B != B:
            raise ValueError(
                f"patch_model: a decode step has batch {B} but the prefill had {self._prompt.B} "
                "(beam search re-ordering is not supported)"
            )
        return None

    def _start_prompt(self, mask: torch.Tensor) -> None:
        B, S = mask.shape
        dev = mask.device
        record, self._record = self._record or {}, None
        if not bool(mask.any(dim=1).all()):
            empty = [b for b in range(B) if not bool(mask[b].any())]
            raise ValueError(f"patch_model: sample(s) {empty} have no real token in the attention mask")
        spans = self.shim.spans(record, mask, self.image_sizes)
        lays = []
        for b, per in enumerate(spans):
            if not per:
                tok = getattr(self.shim, "image_token_id", None)
                what = f"image token id {tok}" if tok is not None else "image sentinel"
                raise ValueError(f"patch_model ({self.family}): sample {b} has no image tokens ({what} not found)")
            if len(per) > 1:
                raise ValueError(
                    f"patch_model ({self.family}): sample {b} has {len(per)} images (spans at "
                    f"{[(l.key_start, l.N) for l in per]}); capture and knockout take one image per sample"
                )
            lays.append(per[0])
        self.layout = lays
        n = [l.N for l in lays]
        n_max = max(n)
        last_row = torch.tensor([int(torch.nonzero(mask[b]).max()) for b in range(B)], dtype=torch.long)
        ks = torch.tensor([l.key_start for l in lays], dtype=torch.long)
        kstart = torch.clamp(ks, max=S - n_max)
        off = ks - kstart
        gather = torch.zeros(B, n_max, dtype=torch.long)
        valid = torch.zeros(B, n_max, dtype=torch.bool)
        for b, l in enumerate(lays):
            order = l.extra.get("sequence_order")
            seq = torch.arange(l.N) if order is None else torch.as_tensor(order, dtype=torch.long)
            gather[b, : l.N] = off[b] + seq
            valid[b, : l.N] = True
        qs = ks + torch.tensor(n, dtype=torch.long)
        pe = last_row + 1
        qs = torch.minimum(qs, pe)
        keep = None
        if self.knockout is not None:
            k = self.knockout.keep
            if tuple(k.shape) != (B, n_max):
                raise ValueError(
                    f"knockout.keep: expected shape ({B}, {n_max}) for this batch (image tokens per sample {n}), "
                    f"got {tuple(k.shape)}"
                )
            keep = torch.ones(B, n_max, dtype=torch.bool)
            k = k.to("cpu")
            for b, l in enumerate(lays):
                keep[b].scatter_(0, gather[b, : l.N], k[b, : l.N])
        self._prompt = _Prompt(
            B=B, last_row=last_row.to(dev), key_start=kstart.to(dev), n_max=n_max, gather=gather.to(dev),
            valid=valid.to(dev), query_start=qs.to(dev), prompt_end=pe.to(dev),
            keep=None if keep is None else keep.to(dev), query_start_host=qs.tolist(), prompt_end_host=pe.tolist(),
        )
        self.maps = None

    # -- the attention function
    def _attend(self, module, query, key, value, attention_mask, scaling, dropout, kwargs):
        li = self._layer_of.get(id(module))
        if li is None:
            raise RuntimeError("patch_model: a patched attention module lost its layer index (unpatched?)")
        for name in ("sliding_window", "softcap", "s_aux"):
            if kwargs.get(name) is not None:
                raise ValueError(f"patch_model: layer {li} uses {name}={kwargs[name]!r}, which the vgkernels kernels do not implement")
        if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
            raise ValueError(f"patch_model: layer {li} is not causal; the vgkernels path patches causal decoder layers only")
        if dropout and module.training:
            raise ValueError(f"patch_model: layer {li} is in training mode with attention dropout {dropout}; call model.eval()")
        B, Hq, Sq, D = query.shape
        Sk = key.shape[2]
        if Sk != self._expected_sk:
            raise ValueError(
                f"patch_model: layer {li} got {Sk} keys but the cache holds {self._expected_sk} positions; patched "
                "layers need a dynamic KV cache (a static cache breaks the position = cache slot convention)"
            )
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        # Every layer of a forward gets the same mask object: derive the padding once
        # (it costs a device sync).
        if self._mask_ref is None or self._mask_ref[0] is not attention_mask:
            self._mask_ref = (attention_mask, key_padding_from_mask(attention_mask, B, Sk))
        kpm = self._mask_ref[1]
        p = self._prompt
        cap = ko = None
        if self._prefill and li in self._cap_index:
            cap = Capture(p.last_row, p.key_start, p.n_max)
        if li in self._ko_layers:
            if p is None:
                raise ValueError("patch_model: knockout needs a prefill of this batch first")
            gen = self.knockout.queries == "prompt+generated"
            # Rows of this call are [Sk - Sq, Sk); skip the kernel's knockout path when none
            # is affected (decode steps under queries="prompt"), deciding on host copies.
            end_h = [Sk if gen else min(e, Sk) for e in p.prompt_end_host]
            if any(e > Sk - Sq and e > min(s_, e) for e, s_ in zip(end_h, p.query_start_host)):
                end = torch.full_like(p.prompt_end, Sk) if gen else torch.clamp(p.prompt_end, max=Sk)
                start = torch.minimum(p.query_start, end)
                ko = Knockout(start, end, p.key_start, p.keep, self.knockout.mode)
        res = _ops.attention(q, k, v, causal=True, softmax_scale=scaling, key_padding_mask=kpm, knockout=ko,
                             capture=cap, backend=self.backend)
        self.calls[li] = self.calls.get(li, 0) + 1
        if cap is None:
            return res, None
        out, _, probs = res
        self._store(li, probs)
        return out, None

    def _store(self, li: int, probs: torch.Tensor) -> None:
        p = self._prompt
        B, H, _ = probs.shape
        if self.maps is None:
            self.maps = torch.full((B, len(self.layers), H, p.n_max), float("nan"), dtype=torch.float32,
                                   device=probs.device)
        row = torch.gather(probs, 2, p.gather[:, None, :].expand(B, H, p.n_max))
        self.maps[:, self._cap_index[li]] = torch.where(p.valid[:, None, :], row, float("nan"))

    def __repr__(self):
        state = "active" if self.active else "unpatched"
        ko = f", knockout layers {sorted(self._ko_layers)}" if self._ko_layers else ""
        return f"<vgkernels patch ({self.family}, {state}): capture layers {self.layers}{ko}>"


def _cache_length(pkv) -> int:
    if pkv is None:
        return 0
    get = getattr(pkv, "get_seq_length", None)
    if get is not None:
        return int(get())
    try:  # legacy tuple of (k, v) per layer
        return int(pkv[0][0].shape[-2])
    except Exception:  # pragma: no cover
        return 0


# ----------------------------------------------------------------------------- entry point


def patch_model(
    model,
    capture: Union[str, Sequence[int], None] = "all",
    knockout: Optional[KnockoutPlan] = None,
    *,
    family: Optional[str] = None,
    processor=None,
    image_sizes=None,
    backend: str = "auto",
    **shim_options,
) -> VGHandle:
    """Capture the last prompt token's attention over the image, and/or knock out image
    keys, in chosen decoder layers of ``model`` (SPEC §5). Use as a context manager::

        with vgkernels.patch_model(model, capture="all") as vg:
            model(**inputs)            # or model.generate(**inputs)
        vg.maps                        # (B, L, H, N) float32
        vg.layout                      # per-sample ImageLayout (key_start, N, grid, cells)

    Parameters
    ----------
    capture : ``"all"``, a list of decoder layer indices, or None.
    knockout : :class:`KnockoutPlan` or None. With neither, no layer is touched and the
        handle only records ``vg.layout`` at each prefill (``vg.maps`` stays None): the
        cheap way to learn where the image sits, e.g. before running suffixes on a cache.
    family : ``"llava"``, ``"qwen"`` or ``"splice"`` to skip detection.
    processor : the model's processor, read for its transform parameters (crop size...).
    image_sizes : original ``(width, height)`` of each image of the next batch, so that
        ``layout[b].cells`` are in original-image pixels (also settable as ``vg.image_sizes``).
    backend : kernel backend for ``vgkernels.attention`` (``"auto"``, ``"triton"``,
        ``"cuda"``, ``"torch"``).
    shim_options : passed to the family shim (e.g. ``token_order="column"`` for splice).

    Raises ``ValueError`` for an unsupported model (listing the families) or a layer out
    of range; missing image tokens and a ``keep`` of the wrong length are
    reported at the prefill.
    """
    from vgkernels.integrations import get_shim

    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    shim = get_shim(model, family=family, processor=processor, **shim_options)
    decoder = shim.decoder()
    layers = list(decoder.layers)
    L = len(layers)
    if capture is None:
        cap_layers: list[int] = []
    elif isinstance(capture, str):
        if capture != "all":
            raise ValueError(f"capture: expected 'all', a list of layer indices or None, got {capture!r}")
        cap_layers = list(range(L))
    else:
        if isinstance(capture, int):
            capture = [capture]
        cap_layers = [_as_int("capture", l) for l in capture]
        if len(set(cap_layers)) != len(cap_layers):
            raise ValueError(f"capture: layer indices repeat: {cap_layers}")
    if knockout is not None and not isinstance(knockout, KnockoutPlan):
        raise TypeError(f"knockout: expected vgkernels.KnockoutPlan, got {type(knockout).__name__}")
    for name, ls in (("capture", cap_layers), ("knockout.layers", knockout.layers if knockout else [])):
        bad = [l for l in ls if not 0 <= l < L]
        if bad:
            raise ValueError(
                f"{name}: layer(s) {bad} out of range; {type(model).__name__} has {L} decoder layers (0..{L - 1})"
            )
    for l in set(cap_layers) | (set(knockout.layers) if knockout else set()):
        if not hasattr(layers[l], "self_attn") or not hasattr(layers[l].self_attn, "config"):
            raise ValueError(f"patch_model: decoder layer {l} has no self_attn with a config to patch")
    handle = VGHandle(model, shim, cap_layers, knockout, backend, image_sizes)
    handle._install(L, decoder, layers)
    return handle


__all__ = ["patch_model", "KnockoutPlan", "VGHandle", "key_padding_from_mask", "ATTN_KEY"]
