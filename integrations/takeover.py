"""The one place where vgkernels takes over a transformers model's attention.

Mechanism
---------
transformers picks each attention module's function from
``self.config._attn_implementation`` through its ``AttentionInterface``. A
:class:`Takeover` gives only the chosen decoder layers' attention modules a shallow copy
of their config whose implementation is :data:`ATTN_KEY`, registered once with
:func:`vg_attention`; every other layer, the model-wide config (so the mask the model
builds) and the vision tower keep what they had. :meth:`Takeover.remove` puts the
original config objects back, so the model is restored bit for bit. Nothing else in the
project registers an attention function.

Per forward call a :class:`CallPlan` (built once, before the first layer runs, from host
integers) tells the patched layers what to do. A layer with nothing to do in this call
(no plan, or a decode step) runs the model's own implementation and returns.

Composed execution (the default)
--------------------------------
A patched layer calls its own implementation (``sdpa``, ``flash_attention_2``,
``eager``... read from the original config at call time) for every row, then

- **knockout band**: the rows ``[r0, r1)`` of this call that any sample knocks out are
  recomputed by the vgkernels kernel on ``(q[r0:r1], K[:end], V[:end])`` (keys cut at the
  band's last row, so bottom-right alignment places the band correctly), and written
  over exactly the rows that each sample knocks out (``torch.where``);
- **captured rows**: a captured row that is not knocked out at this layer is recomputed
  alone, ``attention(q_row (B, 1, H, D), K, V)`` with the keys that row may see, and its
  probabilities over the image span come out of the same kernel call; a captured row in
  the band is rebuilt from the band call's log-sum-exp (``capture_from_lse``, zero on
  knocked-out and padding keys: the probabilities actually applied);
- **question rows** (``capture_rows="question"``): each row's probabilities over the
  image are rebuilt from its log-sum-exp the same way, one row at a time, and averaged.

The capture window (``n`` keys per sample holding its image) lies in the call's keys;
the band has its own window in ``[0, end)``, sized by the images of the samples that
knock out, so a larger image of a sample outside the band never has to fit before
``end``.

``execution="fused"`` sends the whole layer through one ``vgkernels.attention`` call
(knockout and capture inside the kernel). Both give the same outputs and maps to dtype
tolerance. Weights (``output_attentions``) are those of the original implementation,
with knocked-out rows recomputed.

Kernels are called at the backend level with arguments validated once per plan: a layer
never synchronises with the host.

Conventions: transformers hands ``query (B, Hq, Sq, D)``, ``key/value (B, Hkv, Sk, D)``
after the cache update; ``transpose(1, 2)`` views give the kernels' layout without a
copy. Positions are absolute cache columns; the call's query row ``i`` sits at
``Sk - Sq + i`` (a dynamic cache; anything else is detected and refused).
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from vgkernels import _dispatch
from vgkernels._types import Capture, Knockout
from vgkernels.layout import ImageLayout

ATTN_KEY = "vgkernels"
EXECUTIONS = ("composed", "fused")

_NAN = float("nan")


class CannotApply(ValueError):
    """A plan cannot be applied to this call (static cache, sliding window...)."""


# ----------------------------------------------------------------------------- registration


def vg_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls for patched layers (registered as :data:`ATTN_KEY`).

    A module that no takeover owns (a model loaded with ``attn_implementation="vgkernels"``)
    gets plain causal attention from the vgkernels kernel."""
    own = module.__dict__.get("_vg_original_config")
    if torch.compiler.is_compiling():
        # A compiled forward: the layer runs its own implementation and reads no state (a
        # guard on mutable state would recompile every call). The handle notes it eagerly.
        if own is not None:
            return run_original(module, own, query, key, value, attention_mask, scaling, dropout, kwargs)
        return plain_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    owner = module.__dict__.get("_vg_takeover")
    if owner is not None:
        return owner.attend(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if own is not None:  # a deep copy of a patched module: it behaves as the unpatched one
        return run_original(module, own, query, key, value, attention_mask, scaling, dropout, kwargs)
    return plain_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs)


def run_original(module, cfg, query, key, value, mask, scaling, dropout, kwargs, backend: str = "auto"):
    """The attention implementation ``cfg`` names, run with ``cfg`` as the module's config
    (``flash_attention_*`` read ``module.config``)."""
    if cfg._attn_implementation == ATTN_KEY:  # the model's own implementation is ours
        return plain_attention(module, query, key, value, mask, scaling, dropout, kwargs, backend)
    fn = original_function(module, cfg._attn_implementation)
    patched = module.__dict__["config"]
    module.__dict__["config"] = cfg
    try:
        return fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    finally:
        module.__dict__["config"] = patched


def plain_attention(module, query, key, value, mask, scaling, dropout, kwargs, backend: str = "auto"):
    """Causal attention with the model's key padding, through the vgkernels kernel:
    ``(out (B, Sq, Hq, D), None)``."""
    B, _, Sq, D = query.shape
    problem = _layer_problem(module, dropout, kwargs)
    if problem is not None:
        raise ValueError(f"{ATTN_KEY!r} attention: {problem}")
    try:
        kpm = key_padding(mask, B, key.shape[2])
    except CannotApply as e:
        raise ValueError(f"{ATTN_KEY!r} attention: {e}") from None
    scale = float(scaling) if scaling is not None else D ** -0.5
    out, _, _ = _dispatch.get(backend, query.device, "attention").attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), True, scale, kpm, None, None, False)
    return out, None


def _layer_problem(module, dropout, kwargs) -> Optional[str]:
    """Why the vgkernels kernels cannot stand in for this layer's attention, or None."""
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            return f"the layer uses {name}={kwargs[name]!r}, which the vgkernels kernels do not implement"
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        return "the layer is not causal"
    if dropout and module.training:
        return f"the layer is in training mode with attention dropout {dropout}; call model.eval()"
    return None


_REGISTERED = False


def register() -> None:
    """Register :func:`vg_attention` and a mask function under :data:`ATTN_KEY` (once).

    The mask function is sdpa's: should the key ever be used model-wide, transformers
    still builds a padding-aware mask (it drops the mask silently for unknown keys).
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_KEY, vg_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionMaskInterface.register(ATTN_KEY, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    except ImportError:  # pragma: no cover - transformers without masking_utils
        pass
    _REGISTERED = True


def original_function(module, name: Optional[str]):
    """The attention function ``name`` stands for in ``module``'s modeling file."""
    if name in (None, "eager"):
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"cannot find eager_attention_forward next to {type(module).__name__}")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


# ----------------------------------------------------------------------------- masks


def key_padding(mask, B: int, Sk: int) -> Optional[torch.Tensor]:
    """``(B, Sk)`` bool (True = a real key) from the mask a model passes to attention.

    Accepts None, a 2-D ``(B, Sk)`` 0/1 padding mask (flash-attention style), a 4-D
    ``(B|1, 1, Sq, Sk)`` bool mask (True = attend) or an additive float mask. For a 4-D
    causal mask the last query row, which may see every earlier key, tells which keys
    are real. No host synchronisation.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise CannotApply(f"the model passed an attention mask of type {type(mask).__name__}; expected None, "
                          "a 2-D padding mask or a 4-D mask tensor")
    if mask.dim() == 2:
        m = mask
    elif mask.dim() == 4:
        m = mask[:, 0, -1, :]
    else:
        raise CannotApply(f"expected a 2-D or 4-D attention mask, got shape {tuple(mask.shape)}")
    if m.shape[-1] < Sk:
        raise CannotApply(f"the attention mask covers {m.shape[-1]} keys but the layer has {Sk}")
    m = m[..., :Sk]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2 if (m.is_floating_point() and mask.dim() == 4) else m != 0
    # the kernels index (B, Sk) row-major: a real, contiguous tensor
    return m.expand(B, Sk).contiguous()


# ----------------------------------------------------------------------------- plans


@dataclass
class CaptureRows:
    """What each sample captures and where its probabilities go.

    ``mode="last"``: one row per sample. ``rel (B,)``: call-relative row index;
    ``limit (B,)``: its absolute position (keys ``<= limit`` are causal); ``in_band``
    (host, per sample): the row is knocked out at the knockout layers.

    ``mode="question"``: each sample's probabilities averaged over a range of rows (the
    authors' "Q-mode"); rows ``[q0, q1)`` of the call hold every range and
    ``weights (B, q1 - q0)`` float32 is ``1 / count`` on a sample's rows, 0 elsewhere.

    Both: ``win (B,)``, ``n``: the kernel's key window ``[win, win + n)``;
    ``gather (B, n)``: window offset of row-major image token ``t``; ``valid (B, n)``:
    ``t < N_b`` and the sample is captured.
    """

    slots: dict
    rel: torch.Tensor
    limit: torch.Tensor
    win: torch.Tensor
    n: int
    gather: torch.Tensor
    valid: torch.Tensor
    in_band: list
    in_band_t: Optional[torch.Tensor] = None  # ``in_band`` on the device
    mode: str = "last"
    q0: int = 0
    q1: int = 0
    weights: Optional[torch.Tensor] = None
    maps: Optional[torch.Tensor] = None


@dataclass
class Band:
    """The knockout of one call: rows ``[r0, r1)`` (call-relative) hold every knocked-out
    row; ``rows (B, r1 - r0)`` bool says which rows each sample knocks out; the kernel
    sees keys ``[0, end)`` and ``knockout`` in absolute positions of those keys."""

    layers: frozenset
    r0: int
    r1: int
    end: int
    rows: torch.Tensor
    knockout: Knockout
    keep_window: torch.Tensor  # (B, nb) bool over the knockout's window, for output_attentions
    keep_capture: torch.Tensor  # (B, n) bool: ``keep`` over the capture window (True off the image)


@dataclass
class CallPlan:
    """What the patched layers do in one forward call (host integers and device tensors)."""

    B: int
    sq: int
    sk: int
    capture: Optional[CaptureRows] = None
    band: Optional[Band] = None
    _kpm: tuple = field(default=(None, None))
    _row_keys: dict = field(default_factory=dict)
    _views: dict = field(default_factory=dict)

    def key_padding(self, mask, B: int, Sk: int):
        if self._kpm[0] is not mask or self._kpm[0] is None:
            self._kpm = (mask, key_padding(mask, B, Sk))
        return self._kpm[1]

    def view(self, device) -> tuple:
        """``(capture, band)`` with their tensors on ``device`` (a model split over devices
        runs its layers where their weights are); copies are made once per device and
        share the capture's maps."""
        if device not in self._views:
            self._views[device] = (_moved(self.capture, device), _moved(self.band, device))
        return self._views[device]


def _moved(obj, device):
    if obj is None:
        return None
    changes = {f.name: getattr(obj, f.name).to(device) for f in dataclasses.fields(obj)
               if isinstance(getattr(obj, f.name), torch.Tensor) and f.name != "maps"}
    if isinstance(obj, Band):
        changes["knockout"] = Knockout(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in obj.knockout))
    return dataclasses.replace(obj, **changes)


@dataclass
class BandSpec:
    """A knockout request in absolute positions, per sample: rows ``[query_start[b],
    query_end[b])`` lose the image keys whose row-major ``keep[b, t]`` is False."""

    layers: Sequence[int]
    keep: torch.Tensor  # (B, >= N_b) bool, row-major
    mode: str
    query_start: list
    query_end: list


def sequence_offsets(lay: ImageLayout) -> torch.Tensor:
    """``(N,)`` int64: sequence offset (from ``key_start``) of row-major token ``t``."""
    order = lay.extra.get("sequence_order")
    return torch.arange(lay.N) if order is None else torch.as_tensor(order, dtype=torch.long)


def _windows(layouts, n: int, limit: int):
    """Per sample a window ``[win, win + n)`` inside ``[0, limit)`` holding its image
    (``win = min(key_start, limit - n)``), ``gather (B, n)``: the window offset of
    row-major image token ``t``, and ``valid (B, n)``: ``t < N_b``. None: no window."""
    B = len(layouts)
    win, gather, valid = [], torch.zeros(B, n, dtype=torch.long), torch.zeros(B, n, dtype=torch.bool)
    for b, lay in enumerate(layouts):
        if lay is None:
            win.append(0)
            continue
        w = min(lay.key_start, limit - n)
        win.append(w)
        gather[b, : lay.N] = (lay.key_start - w) + sequence_offsets(lay)
        valid[b, : lay.N] = True
    return win, gather, valid


def build_plan(*, sq: int, sk: int, layouts: Sequence[Optional[ImageLayout]], device,
               capture_slots: Optional[dict] = None, rows: Optional[Sequence[int]] = None,
               row_ranges: Optional[Sequence[tuple]] = None, band: Optional[BandSpec] = None) -> CallPlan:
    """A :class:`CallPlan` for a call of ``sq`` rows over ``sk`` keys (absolute positions).

    ``layouts[b]`` is sample ``b``'s image (None: not captured; a knockout needs every
    sample's image). ``rows[b]``: the captured row's absolute position; or
    ``row_ranges[b] = (start, end)``: capture the mean over those rows (all in this call).
    ``band``: the knockout, clipped here to this call's rows.
    """
    B = len(layouts)
    first = sk - sq
    plan = CallPlan(B, sq, sk)
    n = max((l.N for l in layouts if l is not None), default=0)
    if n == 0:
        if band is not None:
            raise ValueError("knockout: no sample of this batch has an image")
        return plan
    # The band: call rows each sample knocks out.
    r0 = r1 = 0
    band_rows = None
    if band is not None:
        kp = band.keep.to("cpu")
        # A sample whose keep drops nothing keeps the model's own rows (bit for bit).
        drops = [l is not None and not bool(kp[b, : l.N].all()) for b, l in enumerate(layouts)]
        lo = [max(band.query_start[b], first) for b in range(B)]
        hi = [min(band.query_end[b], sk) if drops[b] else lo[b] for b in range(B)]
        live = [b for b in range(B) if hi[b] > lo[b]]
        if live:
            r0 = min(lo[b] for b in live) - first
            r1 = max(hi[b] for b in live) - first
            pos = torch.arange(first + r0, first + r1)
            band_rows = torch.stack([(pos >= lo[b]) & (pos < hi[b]) for b in range(B)])
    end = first + r1 if band_rows is not None else sk
    if n > sk:
        raise ValueError(f"an image of {n} tokens does not fit the {sk} keys of this call")
    # The capture window: n keys per sample over the call's keys, moved left where it
    # would pass their end; ``gather`` maps row-major image token t to its window offset.
    win, gather, valid = _windows(layouts, n, sk)
    win_t = torch.tensor(win, dtype=torch.long)
    if band_rows is not None:
        if any(l is None for l in layouts):
            missing = [b for b, l in enumerate(layouts) if l is None]
            raise ValueError(f"knockout: sample(s) {missing} have no image to knock out")
        # The band's own window: the band call sees keys [0, end) only, so it is sized by
        # the images of the samples that knock out (theirs end before their first band
        # row); the other samples keep every key and their window is irrelevant.
        nb = max(layouts[b].N for b in range(B) if band_rows[b].any())
        bwin, bgather, _ = _windows([l if band_rows[b].any() else None for b, l in enumerate(layouts)], nb, end)
        keep_w = torch.ones(B, nb, dtype=torch.bool)
        keep_c = torch.ones(B, n, dtype=torch.bool)
        for b, lay in enumerate(layouts):
            if band_rows[b].any():
                keep_w[b].scatter_(0, bgather[b, : lay.N], kp[b, : lay.N])
            keep_c[b].scatter_(0, gather[b, : lay.N], kp[b, : lay.N])
        ko = Knockout(torch.tensor(band.query_start, dtype=torch.long).clamp(max=end).to(device),
                      torch.tensor(band.query_end, dtype=torch.long).clamp(max=end).to(device),
                      torch.tensor(bwin, dtype=torch.long).to(device), keep_w.to(device), band.mode)
        # clamp start <= end so the kernel sees a valid (possibly empty) range
        ko = ko._replace(query_start=torch.minimum(ko.query_start, ko.query_end))
        plan.band = Band(frozenset(band.layers), r0, r1, end, band_rows.to(device), ko, keep_w.to(device),
                         keep_c.to(device))
    if capture_slots and row_ranges is not None:
        captured = [l is not None and first <= row_ranges[b][0] < row_ranges[b][1] <= sk
                    for b, l in enumerate(layouts)]
        if any(captured):
            q0 = min(row_ranges[b][0] for b in range(B) if captured[b]) - first
            q1 = max(row_ranges[b][1] for b in range(B) if captured[b]) - first
            pos = torch.arange(first + q0, first + q1)
            w = torch.zeros(B, q1 - q0)
            for b in range(B):
                if captured[b]:
                    s, e = row_ranges[b]
                    w[b] = ((pos >= s) & (pos < e)).float() / (e - s)
            ok = torch.tensor(captured)[:, None]
            last = torch.full((B,), sk - 1, dtype=torch.long).to(device)
            plan.capture = CaptureRows(dict(capture_slots), last, last, win_t.to(device), n, gather.to(device),
                                       (valid & ok).to(device), [False] * B, None, "question", q0, q1, w.to(device))
    elif capture_slots and rows is not None:
        captured = [l is not None and first <= rows[b] < sk for b, l in enumerate(layouts)]
        if any(captured):
            rel = [rows[b] - first if captured[b] else sq - 1 for b in range(B)]
            lim = [rows[b] if captured[b] else sk - 1 for b in range(B)]
            in_band = [bool(band_rows is not None and captured[b] and r0 <= rel[b] < r1 and
                            band_rows[b, rel[b] - r0]) for b in range(B)]
            ok = torch.tensor(captured)[:, None]
            plan.capture = CaptureRows(dict(capture_slots), torch.tensor(rel).to(device),
                                       torch.tensor(lim).to(device), win_t.to(device), n, gather.to(device),
                                       (valid & ok).to(device), in_band, torch.tensor(in_band).to(device))
    return plan


# ----------------------------------------------------------------------------- the takeover


class Takeover:
    """Own the attention of chosen decoder layers (see the module docstring).

    ``layers``: the decoder layers (their ``self_attn`` modules are patched);
    ``indices``: which of them; ``execution``: ``"composed"`` or ``"fused"``;
    ``backend``: the kernel backend. ``plan`` (settable) governs the next calls; None
    makes every patched layer run its own implementation.
    """

    def __init__(self, layers: Sequence, indices: Sequence[int], *, execution: str = "composed",
                 backend: str = "auto"):
        if execution not in EXECUTIONS:
            raise ValueError(f"execution: expected one of {EXECUTIONS}, got {execution!r}")
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend: expected one of {_dispatch.BACKENDS}, got {backend!r}")
        self.execution = execution
        self.backend = backend
        self.indices = sorted(set(int(i) for i in indices))
        self.modules = [layers[i].self_attn for i in self.indices]
        self.plan: Optional[CallPlan] = None
        self.calls: dict = {}
        self.on_problem = None  # callable(reason) for a capture that cannot apply mid-forward
        self._slot: dict = {}
        self._saved: list = []

    # -- install / remove
    def install(self) -> "Takeover":
        register()
        busy = [i for i, m in zip(self.indices, self.modules) if m.__dict__.get("_vg_takeover") is not None]
        if busy:
            raise ValueError(f"layer(s) {busy} are already patched by vgkernels; unpatch the other handle first")
        for i, m in zip(self.indices, self.modules):
            if "_vg_original_config" in m.__dict__:  # a deep copy of a patched module: clean it first
                m.__dict__["config"] = m.__dict__.pop("_vg_original_config")
                m.__dict__.pop("_vg_takeover", None)
            cfg = m.config
            new = copy.copy(cfg)
            # Set the storage directly: the property setter would also walk sub-configs.
            new.__dict__["_attn_implementation_internal"] = ATTN_KEY
            self._saved.append((m, cfg))
            m.__dict__["config"] = new
            m.__dict__["_vg_takeover"] = self
            m.__dict__["_vg_original_config"] = cfg
            self._slot[id(m)] = (i, cfg)
        return self

    def remove(self) -> None:
        for m, cfg in reversed(self._saved):
            m.__dict__["config"] = cfg
            m.__dict__.pop("_vg_takeover", None)
            m.__dict__.pop("_vg_original_config", None)
        self._saved.clear()
        self._slot.clear()
        self.plan = None

    def __deepcopy__(self, memo):
        # A deep copy of a patched model is not patched: its modules keep their original
        # config beside the patched one and run it (see vg_attention).
        return None

    # -- the attention function
    def attend(self, module, query, key, value, mask, scaling, dropout, kwargs):
        li, cfg = self._slot[id(module)]
        self.calls[li] = self.calls.get(li, 0) + 1
        plan = self.plan
        cap = plan.capture if plan is not None and plan.capture is not None and li in plan.capture.slots else None
        band = plan.band if plan is not None and plan.band is not None and li in plan.band.layers else None
        if cap is None and band is None:
            return self._original(module, cfg, query, key, value, mask, scaling, dropout, kwargs)
        cap, band = plan.view(query.device)
        cap = cap if cap is not None and li in cap.slots else None
        band = band if band is not None and li in band.layers else None
        B, Hq, Sq, D = query.shape
        Sk = key.shape[2]
        problem = self._problem(module, plan, B, Sq, Sk, dropout, kwargs)
        if problem is not None:
            if band is not None:
                raise ValueError(f"knockout at layer {li}: {problem}")
            self._capture_failed(li, problem)
            return self._original(module, cfg, query, key, value, mask, scaling, dropout, kwargs)
        scale = float(scaling) if scaling is not None else D ** -0.5
        try:
            kpm = plan.key_padding(mask, B, Sk)
        except CannotApply as e:
            if band is not None:
                raise ValueError(f"knockout at layer {li}: {e}") from None
            self._capture_failed(li, str(e))
            return self._original(module, cfg, query, key, value, mask, scaling, dropout, kwargs)
        kernels = _dispatch.get(self.backend, query.device, "attention")
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if self.execution == "fused":
            out, weights, probs = self._fused(kernels, module, cfg, q, k, v, kpm, scale, plan, cap, band, mask,
                                              (query, key, value, scaling, dropout, kwargs))
        else:
            out, weights = self._original(module, cfg, query, key, value, mask, scaling, dropout, kwargs)
            probs = lse = None
            if band is not None:
                out, lse = self._band(kernels, q, k, v, kpm, band, scale, out)
                if isinstance(weights, torch.Tensor):
                    weights = self._band_weights(weights, q, k, kpm, scale, band, lse, plan.sq, plan.sk)
            if cap is not None and cap.mode == "question":
                if band is not None and band.r0 <= cap.q0 and cap.q1 <= band.r1:
                    lse_q = lse[:, :, cap.q0 - band.r0: cap.q1 - band.r0]
                else:
                    # the rows' log-sum-exp, with the knockout where a row has it (rows
                    # [lo, hi) cover the question rows and the band; keys end at the last)
                    lo, hi = (cap.q0, cap.q1) if band is None else (min(cap.q0, band.r0), max(cap.q1, band.r1))
                    end = plan.sk - plan.sq + hi
                    kp = None if kpm is None else kpm[:, :end].contiguous()
                    lse_q = kernels.attention(q[:, lo:hi], k[:, :end], v[:, :end], True, scale, kp,
                                              None if band is None else band.knockout, None, True)[1]
                    lse_q = lse_q[:, :, cap.q0 - lo: cap.q1 - lo]
                probs = self._mean_rows(q, k, lse_q, scale, cap, band, kpm)
            elif cap is not None:
                if band is None or not all(cap.in_band):
                    probs = self._row_capture(kernels, q, k, v, kpm, scale, plan, cap)
                if band is not None and any(cap.in_band):
                    band_probs = self._band_row_capture(q, k, lse, scale, cap, band, kpm)
                    probs = band_probs if probs is None else torch.where(cap.in_band_t[:, None, None], band_probs,
                                                                        probs)
        if cap is not None:
            self._store(plan.capture, li, probs)
        return out, weights

    def _original(self, module, cfg, query, key, value, mask, scaling, dropout, kwargs):
        return run_original(module, cfg, query, key, value, mask, scaling, dropout, kwargs, self.backend)

    @staticmethod
    def _problem(module, plan, B, Sq, Sk, dropout, kwargs) -> Optional[str]:
        if (B, Sq, Sk) != (plan.B, plan.sq, plan.sk):
            return (f"the layer got batch {B}, {Sq} queries over {Sk} keys but the call was planned for batch "
                    f"{plan.B}, {plan.sq} queries over {plan.sk} keys; a static or sliding-window cache breaks "
                    "the position = cache column convention (use a dynamic KV cache)")
        return _layer_problem(module, dropout, kwargs)

    def _capture_failed(self, li: int, reason: str) -> None:
        if self.on_problem is not None:
            self.on_problem(f"layer {li}: {reason}")

    def _band(self, kernels, q, k, v, kpm, band, scale, out):
        """Recompute the knockout rows ``[r0, r1)`` over keys ``[0, end)`` and write them
        over the samples' knocked-out rows of ``out``; returns ``(out, lse (B, Hq, r1 - r0))``."""
        r0, r1, end = band.r0, band.r1, band.end
        kp = None if kpm is None else kpm[:, :end].contiguous()
        o, lse, _ = kernels.attention(q[:, r0:r1], k[:, :end], v[:, :end], True, scale, kp, band.knockout,
                                      None, True)
        rows = band.rows[:, :, None, None]
        merged = torch.where(rows, o.to(out.dtype), out[:, r0:r1])
        out = torch.cat([out[:, :r0], merged, out[:, r1:]], dim=1)
        return out, lse

    @staticmethod
    def _window_keep(cap, kpm, keep=None):
        """``(B, n)`` bool over the capture window: real keys (``kpm``), and ``keep``."""
        if kpm is not None:
            idx = cap.win[:, None] + torch.arange(cap.n, device=cap.win.device)[None, :]
            real = torch.gather(kpm, 1, idx)
            keep = real if keep is None else keep & real
        return keep

    def _band_row_capture(self, q, k, lse, scale, cap, band, kpm):
        """``(B, Hq, n)``: the captured rows inside the band, rebuilt from the band's
        log-sum-exp (``exp(scale·q·k_j − lse)``, zero on knocked-out and padding keys);
        rows of samples outside the band are garbage, replaced by the caller."""
        B = q.shape[0]
        rebuild = _dispatch.get(self.backend, q.device, "capture_from_lse").capture_from_lse
        i = (cap.rel - band.r0).clamp(0, band.r1 - band.r0 - 1)
        ar = torch.arange(B, device=q.device)
        q_row = q[ar, cap.rel]  # (B, Hq, D)
        lse_row = lse[ar, :, i].float()  # (B, Hq)
        keep = self._window_keep(cap, kpm, band.keep_capture)
        return rebuild(q_row, k, lse_row, cap.win, cap.n, scale, keep)

    def _row_capture(self, kernels, q, k, v, kpm, scale, plan, cap):
        """``(B, Hq, n)``: each captured row's probabilities, from a one-row kernel call."""
        B = q.shape[0]
        if q.device not in plan._row_keys:
            cols = torch.arange(plan.sk, device=q.device)
            allowed = cols[None, :] <= cap.limit[:, None]
            plan._row_keys[q.device] = (allowed if kpm is None else allowed & kpm).contiguous()
        q_row = q[torch.arange(B, device=q.device), cap.rel][:, None]  # (B, 1, Hq, D)
        last = torch.full((B,), plan.sk - 1, dtype=torch.long, device=q.device)
        _, _, probs = kernels.attention(q_row, k, v, True, scale, plan._row_keys[q.device], None,
                                        Capture(last, cap.win, cap.n), True)
        return probs

    def _mean_rows(self, q, k, lse, scale, cap, band, kpm):
        """``(B, Hq, n)``: the probabilities over the window averaged over each sample's
        rows, rebuilt one row at a time from the rows' log-sum-exp (``capture_from_lse``:
        ``exp(scale·q·k_j − lse)``, zero on padding keys and, in a sample's knocked-out
        rows, on its knocked-out keys), so no ``rows × keys`` score matrix is ever formed."""
        rebuild = _dispatch.get(self.backend, q.device, "capture_from_lse").capture_from_lse
        real = self._window_keep(cap, kpm)
        acc = None
        for i in range(cap.q1 - cap.q0):
            r = cap.q0 + i
            keep = real
            if band is not None and band.r0 <= r < band.r1:
                knocked = band.rows[:, r - band.r0, None]  # (B, 1): this row is knocked out
                kept = band.keep_capture | ~knocked
                keep = kept if keep is None else keep & kept
            w = cap.weights[:, i]
            p = rebuild(q[:, r], k, lse[:, :, i].float(), cap.win, cap.n, scale, keep)
            # rows a sample does not average (weight 0) may have no key at all (lse = -inf)
            p = torch.where(w[:, None, None] > 0, p * w[:, None, None], 0.0)
            acc = p if acc is None else acc + p
        return acc

    def _fused(self, kernels, module, cfg, q, k, v, kpm, scale, plan, cap, band, mask, raw):
        """The whole layer in one kernel call; ``(out, weights, probs)``."""
        ko = None
        if band is not None:
            # the fused call sees every key: the band's knockout holds as it is
            ko = band.knockout
        capture = Capture(cap.limit, cap.win, cap.n) if cap is not None and cap.mode == "last" else None
        out, lse, probs = kernels.attention(q, k, v, True, scale, kpm, ko, capture, cap is not None)
        if cap is not None and cap.mode == "question":
            probs = self._mean_rows(q, k, lse[:, :, cap.q0:cap.q1], scale, cap, band, kpm)
        weights = None
        if cfg._attn_implementation in (None, "eager"):
            # the model would return eager weights: give them, knocked-out rows recomputed
            query, key, value, scaling, dropout, kwargs = raw
            _, weights = self._original(module, cfg, query, key, value, mask, scaling, dropout, kwargs)
            if band is not None and isinstance(weights, torch.Tensor):
                r0, r1 = band.r0, band.r1
                lse_band = kernels.attention(q[:, r0:r1], k[:, :band.end], v[:, :band.end], True, scale,
                                             None if kpm is None else kpm[:, :band.end].contiguous(), band.knockout, None,
                                             True)[1]
                weights = self._band_weights(weights, q, k, kpm, scale, band, lse_band, plan.sq, plan.sk)
        return out, weights, probs

    @staticmethod
    def _band_weights(weights, q, k, kpm, scale, band, lse, sq, sk):
        """``weights (B, Hq, Sq, Sk)`` with the knocked-out rows replaced by the
        probabilities the band applied: ``exp(s - lse)`` over allowed keys, zero on
        knocked-out ones (both modes; ``lse`` is the kernel's, per mode)."""
        r0, r1 = band.r0, band.r1
        B, _, Hq, D = q.shape
        Hkv = k.shape[2]
        qb = q[:, r0:r1].float()
        kf = k.float().repeat_interleave(Hq // Hkv, dim=2)
        s = torch.einsum("bihd,bjhd->bhij", qb, kf) * scale
        pos = torch.arange(sk - sq + r0, sk - sq + r1, device=q.device)
        cols = torch.arange(sk, device=q.device)
        allowed = (cols[None, :] <= pos[:, None])[None]
        if kpm is not None:
            allowed = allowed & kpm[:, None, :]
        ko = band.knockout
        in_rows = (pos[None, :] >= ko.query_start[:, None]) & (pos[None, :] < ko.query_end[:, None])
        j = cols[None, :] - ko.key_start[:, None]
        inside = (j >= 0) & (j < band.keep_window.shape[1])
        dropped = inside & ~torch.gather(band.keep_window, 1, j.clamp(0, band.keep_window.shape[1] - 1))
        allowed = allowed & ~(in_rows[:, :, None] & dropped[:, None, :])
        p = torch.exp(s - lse[..., None]).masked_fill(~allowed[:, None], 0.0)
        rows = band.rows[:, None, :, None]
        new = torch.where(rows, p.to(weights.dtype), weights[:, :, r0:r1])
        return torch.cat([weights[:, :, :r0], new, weights[:, :, r1:]], dim=2)

    def _store(self, cap: CaptureRows, li: int, probs: torch.Tensor) -> None:
        """Write one layer's ``probs (B, H, n)`` (window order) into ``cap.maps`` (row-major,
        NaN where invalid), on the device of the capture's first layer."""
        B, H, _ = probs.shape
        if cap.maps is None:
            L = max(cap.slots.values()) + 1
            cap.maps = torch.full((B, L, H, cap.n), _NAN, dtype=torch.float32, device=cap.gather.device)
        probs = probs.to(cap.maps.device, non_blocking=True)
        row = torch.gather(probs.float(), 2, cap.gather[:, None, :].expand(B, H, cap.n))
        cap.maps[:, cap.slots[li]] = torch.where(cap.valid[:, None, :], row, _NAN)


__all__ = ["ATTN_KEY", "EXECUTIONS", "Takeover", "CallPlan", "BandSpec", "build_plan", "key_padding",
           "register", "vg_attention", "original_function", "sequence_offsets", "CannotApply"]
