"""``patch_model``: capture and knockout inside a transformers VLM, per layer (SPEC §5).

The attention of the chosen decoder layers is taken over by :mod:`.takeover` (one
registration, one per-layer switch, one plan per forward call). This module watches the
model's calls and builds that plan:

- a pre-hook on the model records what the user passed (ids, image grids, sizes,
  whether pixels came with them) through the family shim (:mod:`.families`);
- ``generate`` is wrapped (per instance) so that its first forward is known to be the
  prompt and its record (the full ids, before any cache slicing) is kept;
- a pre-hook on the decoder (the module owning ``layers``) sees the mask the LLM
  receives and the KV cache — found by type, whatever the keyword is called
  (``past_key_values`` up to transformers 5.23, ``cache`` from 5.24) — and builds the
  :class:`~.takeover.CallPlan` of the call before the first layer runs.

The **prompt call** is the first forward of a ``generate`` call, or a forward on an
empty cache. In it, the shim finds each sample's image span, the captured row is the
last real token of each sample, and the knockout rows run from the first text token
after the image through the last prompt token. Other calls are decode steps: no
capture; the knockout applies to generated rows only with ``queries="prompt+generated"``.

Passive capture: where capture cannot apply (no image tokens, image tokens without pixel
inputs, ``inputs_embeds`` only, a static cache, a compiled forward, packed sequences,
several images in a sample), the layers run their own implementation, the samples' maps
are NaN and ``vg.skipped`` lists ``(sample, reason)``; one warning per reason. A
knockout that cannot be applied raises ``ValueError``.

``generate`` with beams or ``num_return_sequences > 1`` runs its prefill on copies of
each input sample; ``vg.maps``/``vg.layout`` keep one row per input sample (the copies
are identical), and a knockout's ``keep`` is given per input sample.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from vgkernels._types import KNOCKOUT_MODES
from vgkernels.layout import ImageLayout

from .takeover import ATTN_KEY, EXECUTIONS, BandSpec, Takeover, build_plan

QUERY_MODES = ("prompt", "prompt+generated")
CAPTURE_ROWS = ("last", "question")
_FAR = 1 << 62


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


# ----------------------------------------------------------------------------- call inspection


def find_cache(args: tuple, kwargs: dict):
    """The KV cache among a forward's arguments, found by type (any keyword name)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return None
    for v in list(kwargs.values()) + list(args):
        if isinstance(v, Cache):
            return v
    return None


def cache_length(cache) -> int:
    """Columns a dynamic cache holds (0 for None); from tensor shapes, no host sync."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def is_static(cache) -> bool:
    return cache is not None and bool(getattr(cache, "is_compileable", False))


def packed_reason(kwargs: dict) -> Optional[str]:
    """Why a call looks like packed sequences (several documents in one row), or None."""
    for name in ("cu_seq_lens_q", "cu_seqlens_q", "cu_seq_lens_k"):
        if kwargs.get(name) is not None:
            return f"packed sequences ({name} given)"
    pos = kwargs.get("position_ids")
    if kwargs.get("attention_mask") is None and isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[1] > 1:
        if bool((pos[:, 1:] < pos[:, :-1]).any()):
            return "packed sequences (position_ids restart inside a row)"
    return None


# ----------------------------------------------------------------------------- handle


@dataclass
class _Prompt:
    """What the prompt call fixed, for the decode steps that follow (host values)."""

    B: int
    layouts: list
    keep: Optional[torch.Tensor]
    query_start: list
    prompt_end: list


class VGHandle:
    """Returned by :func:`patch_model`; a context manager.

    Attributes
    ----------
    maps : ``(B, L, H, N)`` float32 or None — the last real prompt token's attention over
        the image at each captured layer and head, from the latest prompt call; NaN past
        each sample's ``layout[b].N`` and for skipped samples.
    layers : the captured decoder layer indices (``maps[:, i]`` is ``layers[i]``).
    layout : one :class:`vgkernels.ImageLayout` per sample of the latest prompt call
        (None for a sample without exactly one image).
    skipped : ``[(sample, reason)]`` of the latest prompt call: samples whose capture did
        not apply (their maps are NaN), or whole calls (sample None).
    family : the shim's family name.
    calls : ``{layer: count}`` of calls into the patched layers since patching.
    image_sizes : original ``(width, height)`` per image of the next prompt (settable);
        without them cells are in the pixels of the image the model received.
    knockout : the :class:`KnockoutPlan` (settable, on the same layers).
    execution : ``"composed"`` or ``"fused"``.
    """

    def __init__(self, model, shim, capture_layers, knockout, backend, image_sizes, execution, capture_rows="last"):
        self.model = model
        self.shim = shim
        self.family = shim.family
        self.layers = list(capture_layers)
        self._knockout = knockout
        self.backend = backend
        self.execution = execution
        self.capture_rows = capture_rows
        self.image_sizes = image_sizes
        self.layout: list = []
        self.skipped: list = []
        chosen = sorted(set(self.layers) | (set(knockout.layers) if knockout else set()))
        self._takeover = Takeover(shim.layers(), chosen, execution=execution, backend=backend) if chosen else None
        if self._takeover is not None:
            self._takeover.on_problem = self._layer_problem
        self._slots = {l: i for i, l in enumerate(self.layers)}
        self._rows = None  # the CaptureRows of the latest prompt call
        self._shape = None  # (B, N) of the latest prompt call
        self._expand = 1
        self._n_heads = None
        self._prompt: Optional[_Prompt] = None
        self._fwd_record = None
        self._gen_record = None
        self._gen_depth = 0
        self._gen_forwards = 0
        self._warned: set = set()
        self._hooks = []
        self._saved_generate = []
        self.active = False

    # -- context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unpatch()
        return False

    # -- public state
    @property
    def knockout(self):
        return self._knockout

    @knockout.setter
    def knockout(self, plan):
        if plan is not None and not isinstance(plan, KnockoutPlan):
            raise TypeError(f"knockout: expected vgkernels.KnockoutPlan, got {type(plan).__name__}")
        patched = set(self._takeover.indices) if self._takeover is not None else set()
        if plan is not None and not set(plan.layers) <= patched:
            raise ValueError(f"knockout.layers: {sorted(set(plan.layers) - patched)} are not patched by this "
                             f"handle (patched: {sorted(patched)}); patch them with patch_model(knockout=...)")
        self._knockout = plan

    @property
    def calls(self) -> dict:
        return dict(self._takeover.calls) if self._takeover is not None else {}

    @property
    def maps(self) -> Optional[torch.Tensor]:
        if not self.layers or self._shape is None:
            return None
        m = self._rows.maps if self._rows is not None else None
        if m is None:
            B, n = self._shape
            m = torch.full((B, len(self.layers), self._n_heads or 0, n), float("nan"), dtype=torch.float32)
        return m[:: self._expand]

    # -- install / remove
    def _install(self) -> None:
        if self._takeover is not None:
            self._takeover.install()
        try:
            self._hooks.append(self.model.register_forward_pre_hook(self._outer_pre_hook, with_kwargs=True))
            self._hooks.append(self.shim.decoder().register_forward_pre_hook(self._decoder_pre_hook,
                                                                              with_kwargs=True))
            for owner in self.shim.generate_owners():
                if not callable(getattr(owner, "generate", None)):
                    continue
                wrapper = _Generate(self, owner)
                owner.__dict__["generate"] = wrapper
                self._saved_generate.append((owner, wrapper))
        except Exception:
            self.unpatch()
            raise
        self.active = True

    def unpatch(self) -> None:
        """Restore the model exactly (idempotent)."""
        if self._takeover is not None:
            self._takeover.remove()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for owner, wrapper in reversed(self._saved_generate):
            wrapper.remove_from(owner)
        self._saved_generate.clear()
        self.active = False

    def _generate(self, orig, args, kwargs):
        if not self.active:
            return orig(*args, **kwargs)
        outer = self._gen_depth == 0
        if outer:
            self._gen_forwards = 0
            self._gen_record = self.shim.observe(args, kwargs)
            self._reset()
        self._gen_depth += 1
        try:
            out = orig(*args, **kwargs)
        finally:
            self._gen_depth -= 1
            if outer:
                record, self._gen_record = self._gen_record, None
        if outer and self._gen_forwards == 0:
            # generate() ran the model compiled: no hook ran eagerly, nothing was captured
            ids = record.get("input_ids") if record else None
            B = int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 1
            self._skip_call(B, "the forward ran compiled (torch.compile); capture and knockout run only in an "
                               "eager forward")
        return out

    def _reset(self) -> None:
        self.skipped, self.layout, self._prompt, self._expand = [], [], None, 1
        self._rows, self._shape = None, None

    def __deepcopy__(self, memo):
        # A deep copy of the patched model gets the hooks and generate wrappers of a handle
        # that is not active: they pass everything through.
        return _Detached()

    # -- hooks
    def _outer_pre_hook(self, module, args, kwargs):
        if torch.compiler.is_compiling() or not self.active:
            return None
        rec = self.shim.observe(args, kwargs)
        if rec is not None:
            self._fwd_record = rec
        return None

    def _decoder_pre_hook(self, module, args, kwargs):
        if torch.compiler.is_compiling() or not self.active:
            return None
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            return None
        B, Sq = int(x.shape[0]), int(x.shape[1])
        cache = find_cache(args, kwargs)
        static = is_static(cache)
        past = 0 if static else cache_length(cache)
        if self._gen_depth > 0:
            prompt = self._gen_forwards == 0
            self._gen_forwards += 1
        else:
            prompt = past == 0
        if self._takeover is not None:
            self._takeover.plan = None
        if prompt:
            self._prompt_call(B, Sq, past, static, cache, args, kwargs, x.device)
        elif self._takeover is not None and self._knockout is not None:
            self._decode_call(B, Sq, past, static, x.device)
        return None

    # -- prompt
    def _record(self, past: int) -> dict:
        """What the prompt call's spans are read from: the forward's own record, or inside
        ``generate`` the generate call's (its ids are the full prompt, before any
        expansion for beams or slicing for a filled cache), completed by the forward's."""
        fwd, gen = self._fwd_record, self._gen_record if self._gen_depth > 0 else None
        self._fwd_record = None
        if gen is None or gen.get("input_ids") is None:
            return dict(fwd or gen or {})
        rec = dict(gen)
        fwd = fwd or {}
        same = _record_batch(fwd, int(gen["input_ids"].shape[0])) == int(gen["input_ids"].shape[0]) and \
            isinstance(fwd.get("input_ids"), torch.Tensor) and fwd["input_ids"].shape == gen["input_ids"].shape
        if same:
            for k, v in fwd.items():
                if rec.get(k) is None:
                    rec[k] = v
        rec["has_pixels"] = bool(fwd.get("has_pixels") or gen.get("has_pixels"))
        return rec

    def _prompt_call(self, B, Sq, past, static, cache, args, kwargs, device) -> None:
        record = self._record(past)
        self._reset()
        self._shape = (B, 0)
        ko = self._knockout
        total = past + Sq
        reason = None
        if static:
            reason = (f"the KV cache is a {type(cache).__name__}, not a dynamic cache (positions must be cache "
                      "columns: use a dynamic KV cache)")
        else:
            reason = packed_reason(kwargs)
        if reason is not None:
            return self._skip_call(B, reason)
        am = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        mask = _real_keys(am, B, total, device)
        if mask is None:
            return self._skip_call(B, "the LLM's attention mask has an unexpected shape")
        ids = record.get("input_ids")
        if self._gen_depth > 0 and self.shim.ids_are_columns and isinstance(ids, torch.Tensor) and \
                past < ids.shape[-1] < total:
            # assisted decoding verifies drafted tokens in the same call: the prompt ends before them
            mask = mask[:, : ids.shape[-1]]
        if not bool(mask.any(dim=1).all()):
            empty = [b for b in range(B) if not bool(mask[b].any())]
            return self._skip_call(B, f"sample(s) {empty} have no real token in the attention mask")
        rec_b = _record_batch(record, B)
        if rec_b is None:
            return self._skip_call(B, f"the call's inputs do not match the LLM's batch of {B}")
        per_rec = B // rec_b  # the splice family's generate() expands embeddings, not ids
        try:
            found = self.shim.spans(record, mask[::per_rec].cpu(), self.image_sizes)
        except ValueError as e:
            return self._skip_call(B, str(e))
        has_pixels = record.get("has_pixels", True)
        lays, reasons = [], []
        for i in range(B):
            per = found[i // per_rec]
            if not per:
                reasons.append(self._no_image_reason())
            elif not has_pixels and per[0].key_start + per[0].N > past:
                # (image tokens already in the cache were encoded by an earlier call)
                reasons.append("image tokens without pixel inputs: the model reads them as text")
            elif len(per) > 1:
                reasons.append(f"{len(per)} images (spans at {[(l.key_start, l.N) for l in per]}); capture and "
                               "knockout take one image per sample")
            else:
                reasons.append(None)
            lays.append(per[0] if reasons[-1] is None else None)
        # generate() with beams / several return sequences runs copies of each input sample
        k = B // self._user_batch(B, rec_b)
        self._expand = k
        self.layout = lays[::k]
        last = mask.shape[1] - 1 - torch.flip(mask, dims=[1]).to(torch.int8).argmax(dim=1)
        last = last.tolist()
        for u, r in enumerate(reasons[::k]):
            if r is not None:
                self._note(u, r, raise_for_knockout=True)
        band = None
        if ko is not None:
            band = self._band(lays, last, past, k)
        self._shape = (B, max((l.N for l in lays if l is not None), default=0))
        if self._takeover is None:
            return
        rows = [last[b] if lays[b] is not None else 0 for b in range(B)]
        ranges = None
        if self.capture_rows == "question":
            ranges = [(min(l.key_start + l.N, e + 1), e + 1) if l is not None else (0, 0)
                      for l, e in zip(lays, last)]
        if self.layers:
            for u in range(B // k):
                b = u * k
                if lays[b] is None:
                    continue
                if ranges is not None and ranges[b][0] >= ranges[b][1]:
                    self._note(u, "no question rows after the image", raise_for_knockout=False)
                elif (ranges[b][0] if ranges is not None else rows[b]) < past:
                    what = "question rows start" if ranges is not None else "last prompt token is"
                    self._note(u, f"its {what} at position {ranges[b][0] if ranges is not None else rows[b]}, "
                                  f"inside the KV cache ({past} positions) computed before this call",
                               raise_for_knockout=False)
        plan = build_plan(sq=Sq, sk=total, layouts=lays, device=device, capture_slots=self._slots, rows=rows,
                          row_ranges=ranges, band=band)
        self._takeover.plan = plan
        self._n_heads = self._heads()
        self._rows = plan.capture
        self._prompt = _Prompt(B, lays, band.keep if band else None, band.query_start if band else [],
                               [e + 1 for e in last])

    def _user_batch(self, B: int, rec_b: int) -> int:
        """The batch the user passed: generate()'s own ids when it expanded them."""
        gen = self._gen_record if self._gen_depth > 0 else None
        ids = gen.get("input_ids") if gen else None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] and B % ids.shape[0] == 0:
            return int(ids.shape[0])
        return rec_b

    def _band(self, lays, last, past, k) -> BandSpec:
        ko = self._knockout
        ns = [l.N for l in lays]
        n = max(ns)
        keep = ko.keep
        want = (len(lays) // k, n)
        if tuple(keep.shape) != want:
            raise ValueError(
                f"knockout.keep: expected shape {want} for this batch (image tokens per sample "
                f"{ns[::k]}), got {tuple(keep.shape)}"
            )
        keep = keep.to("cpu")  # read once here; the plans of later calls reuse it
        if k > 1:
            keep = keep.repeat_interleave(k, dim=0)
        qs = [min(l.key_start + l.N, e + 1) for l, e in zip(lays, last)]
        qe = [e + 1 for e in last] if ko.queries == "prompt" else [_FAR] * len(lays)
        early = [b for b in range(len(lays)) if qs[b] < past and qe[b] > qs[b]]
        if early:
            raise ValueError(
                f"knockout: sample(s) {early} have question rows from position {qs[early[0]]}, but the KV cache "
                f"already holds {past} positions computed without the knockout; run the prompt from an empty cache"
            )
        return BandSpec(ko.layers, keep, ko.mode, qs, qe)

    def _decode_call(self, B, Sq, past, static, device) -> None:
        ko, p = self._knockout, self._prompt
        if p is None or p.B != B or static or p.keep is None:
            why = ("a static cache" if static else "no prompt call of this batch preceded it" if p is None else
                   f"its batch of {B} differs from the prompt's {p.B}" if p.B != B else
                   "the prompt call ran without this knockout")
            raise ValueError(f"knockout: cannot apply to a call of {Sq} rows after {past} cached positions: {why}")
        qe = p.prompt_end if ko.queries == "prompt" else [_FAR] * B
        if all(e <= past for e in qe):
            return  # no row of this call is knocked out
        band = BandSpec(ko.layers, p.keep, ko.mode, p.query_start, qe)
        self._takeover.plan = build_plan(sq=Sq, sk=past + Sq, layouts=p.layouts, device=device, band=band)

    # -- skips
    def _no_image_reason(self) -> str:
        tok = getattr(self.shim, "image_token_id", None)
        what = f"image token id {tok}" if tok is not None else "image sentinel"
        return f"no image tokens ({what} not found)"

    def _skip_call(self, B: int, reason: str) -> None:
        self._note(None, reason, raise_for_knockout=True)
        self.layout = [None] * B
        self._shape = (B, 0)

    def _note(self, sample, reason: str, raise_for_knockout: bool) -> None:
        where = "the call" if sample is None else f"sample {sample}"
        if self._knockout is not None and raise_for_knockout:
            raise ValueError(f"patch_model ({self.family}): knockout cannot apply to {where}: {reason}")
        self.skipped.append((sample, reason))
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"vgkernels: capture skipped for {where} ({reason}); its maps are NaN and the layers ran "
                          "their own attention", stacklevel=4)

    def _layer_problem(self, reason: str) -> None:
        self._note(None, reason, raise_for_knockout=False)

    def _heads(self) -> Optional[int]:
        mods = self._takeover.modules if self._takeover is not None else []
        cfg = getattr(mods[0], "config", None) if mods else None
        h = getattr(cfg, "num_attention_heads", None)
        return int(h) if h is not None else None

    def __repr__(self):
        state = "active" if self.active else "unpatched"
        ko = f", knockout layers {sorted(self._knockout.layers)}" if self._knockout else ""
        return f"<vgkernels patch ({self.family}, {state}, {self.execution}): capture layers {self.layers}{ko}>"


class _Generate:
    """The per-instance ``generate`` while patched (an object rather than a closure, so
    that a deep copy of the model binds it to the copy). It remembers what it replaced in
    the instance dict (``had``, ``prev``) so that handles unpatched in any order restore
    the model: one removed from under another hands its own ``orig``/``had``/``prev`` to
    the wrapper above it."""

    def __init__(self, handle, owner):
        self.handle = handle
        self.had = "generate" in owner.__dict__
        self.prev = owner.__dict__.get("generate")
        self.orig = owner.generate
        self.__wrapped__ = self.orig
        self.__doc__ = getattr(self.orig, "__doc__", None)

    def __call__(self, *args, **kwargs):
        return self.handle._generate(self.orig, args, kwargs)

    def remove_from(self, owner) -> None:
        node = owner.__dict__.get("generate")
        if node is self:
            if self.had:
                owner.__dict__["generate"] = self.prev
            else:
                owner.__dict__.pop("generate", None)
            return
        while isinstance(node, _Generate):
            if node.prev is self:  # node wraps this one: splice this one out
                node.orig, node.__wrapped__, node.had, node.prev = self.orig, self.orig, self.had, self.prev
                return
            node = node.prev
        # generate was replaced by something else since: leave it as it is


class _Detached:
    """What a deep copy of a handle becomes: inactive, so its hooks pass through."""

    active = False

    def _generate(self, orig, args, kwargs):
        return orig(*args, **kwargs)


def _record_batch(record: dict, B: int) -> Optional[int]:
    """The batch of the observed call (``B`` or a divisor of it: generate's expansion)."""
    ids = record.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return B
    b = int(ids.shape[0])
    return b if b and B % b == 0 else None


def _real_keys(am, B: int, total: int, device) -> Optional[torch.Tensor]:
    """``(B, total)`` bool of real keys from the mask the decoder received."""
    if am is None:
        return torch.ones(B, total, dtype=torch.bool, device=device)
    if not isinstance(am, torch.Tensor):
        return None
    if am.dim() == 4:
        m = am[:, 0, -1, :]
        m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m.bool()
    elif am.dim() == 2:
        m = am.bool()
    else:
        return None
    if m.shape[-1] != total:
        return None
    return m.expand(B, total)


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
    execution: str = "composed",
    capture_rows: str = "last",
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
        handle only records ``vg.layout`` at each prompt call (``vg.maps`` stays None).
    family : ``"llava"``, ``"qwen"`` or ``"splice"`` to skip detection.
    processor : the model's processor, read for its transform parameters (crop size...).
    image_sizes : original ``(width, height)`` of each image of the next batch, so that
        ``layout[b].cells`` are in original-image pixels (also settable as ``vg.image_sizes``).
    backend : kernel backend (``"auto"``, ``"triton"``, ``"cuda"``, ``"torch"``).
    execution : ``"composed"`` (default): ordinary rows come from the layer's own
        implementation, vgkernels computes only the knockout band and the captured rows;
        ``"fused"``: the whole patched layer runs in one vgkernels kernel.
    capture_rows : ``"last"`` (default): the last real prompt token's probabilities;
        ``"question"``: per head, the probabilities over the image averaged over the
        question rows (the first text token after the image through the last prompt
        token; the authors' "Q-mode"), rebuilt row by row from each row's log-sum-exp so
        that no ``rows × keys`` scores are formed.
    shim_options : passed to the family shim (e.g. ``token_order="column"`` for splice).

    Raises ``ValueError`` for an unsupported model (listing the families) or a layer out
    of range. Capture never raises at run time (see ``vg.skipped``); a knockout that
    cannot be applied raises at the prompt call.
    """
    from .families import get_shim
    from vgkernels._dispatch import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if execution not in EXECUTIONS:
        raise ValueError(f"execution: expected one of {EXECUTIONS}, got {execution!r}")
    if capture_rows not in CAPTURE_ROWS:
        raise ValueError(f"capture_rows: expected one of {CAPTURE_ROWS}, got {capture_rows!r}")
    shim = get_shim(model, family=family, processor=processor, **shim_options)
    layers = shim.layers()
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
    handle = VGHandle(model, shim, cap_layers, knockout, backend, image_sizes, execution, capture_rows)
    try:
        handle._install()
    except ValueError as e:
        raise ValueError(f"patch_model: {e}") from None
    return handle


__all__ = ["patch_model", "KnockoutPlan", "VGHandle", "ATTN_KEY", "find_cache", "QUERY_MODES"]
