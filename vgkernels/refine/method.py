"""VGRefine: attention triage + attention knockout at inference time (paper Sec. 3).

Given images and questions, :class:`VGRefine`

(I) *triage*: takes the last prompt token's attention over the image at the top-K
    grounding heads for the question prompt, divides it by the head-mean attention of
    the same layers under the reference prompt ("Write a general description of the
    image."), averages over the K heads and keeps the image tokens at or above the p-th
    percentile (:func:`vgkernels.triage_mask`);
(II) *knockout*: recomputes the prompt with the attention from the question tokens (the
    first text token after the image through the last prompt token) to the dropped image
    tokens removed at ``layers`` (``mode="renorm"``: the authors' additive ``-inf`` mask;
    ``"zero"``: ``α̂ = α ⊙ M``), then decodes (greedily by default; sampling settings as
    ``generate`` takes them), the knockout applying to the prompt rows only.

Cost. The authors run three full forward passes (eager attention, batch 1) and then
``generate``. Here (see :mod:`vgkernels.integrations.continuation`), batched with padding:

- the question prompt runs once — that prefill is the one a plain ``generate`` pays
  anyway — with the model's own attention, plus one captured row per sample at the heads'
  layers (:func:`vgkernels.patch_model`, composed execution), and keeps its KV cache;
- the reference prompt shares the prefix through the image, so only its text after the
  image is computed, as a suffix pass on the cache that hides the question's columns;
- the knockout pass recomputes only the question rows and only at layers
  ``>= min(layers)``, from the hidden states the first pass produced at the input of that
  layer and the cached prefix; its last row gives the first answer token, and decoding
  continues from the combined cache.

A hyper-parameter sweep (:meth:`VGRefine.sweep`) pays the first two steps once and only
the knockout suffix and decoding per distinct setting.

Settings used in the paper (Sec. 4, Supp.):

- HuatuoGPT-Vision-7B: ``heads="huatuogpt-vision-7b"`` (K = 20, ranked by lowest KL on
  natural images), ``layers=[16]``, ``percentile=50``.
- HuatuoGPT-Vision-34B: the same K = 20 and p = 50 with ``layers=[34, 35, 36]``
  (``vgkernels.presets.LAYERS["huatuogpt-vision-34b"]``); its head list is not published,
  derive it as below.
- Another model: run a grounding sweep on natural images with boxes (the authors' COCO
  question file), e.g. ``vgkernels sweep --model DIR --data coco.jsonl --out runs/coco``,
  then ``vgkernels heads --sweep runs/coco --top-k 20`` writes ``heads.json`` (heads
  ranked by lowest mean KL); pass its path as ``heads=``. Pick the knockout layer(s)
  where the per-layer grounding (the sweep's layer table) peaks, as Fig. 3 of the paper.

Example::

    from vgkernels import VGRefine
    vr = VGRefine(model, processor, heads="huatuogpt-vision-7b", layers=[16], percentile=50)
    res = vr([img], ["Is there a lesion in the liver?\\nAnswer the question using a single word or phrase."],
             baseline=True)
    res.answers, res.baseline_answers, res.keep[0]
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from vgkernels.integrations import continuation as E
from vgkernels.integrations.takeover import BandSpec, build_plan

from ..constants import IMAGE_TOKEN_INDEX, REFERENCE_PROMPT
from ..presets import resolve_heads
from ..triage import triage_mask


@dataclass(frozen=True)
class Setting:
    """One VGRefine hyper-parameter setting: top ``k`` heads (None: all given), percentile
    ``p``, knockout ``layers`` and ``mode``."""

    k: Optional[int] = None
    p: float = 50.0
    layers: tuple = (16,)
    mode: str = "renorm"

    def label(self) -> str:
        k = "all" if self.k is None else str(self.k)
        return f"K={k} p={self.p:g} layers={'+'.join(map(str, self.layers))}" + (
            "" if self.mode == "renorm" else f" mode={self.mode}")


@dataclass
class RefineResult:
    """What one :class:`VGRefine` call returns (batch of ``B`` questions).

    ``answers``: decoded answers with the knockout; ``tokens (B, G)`` their ids
    (``pad`` after EOS); ``keep``: per sample a ``(N_b,)`` bool keep mask over its image
    tokens (row-major, SPEC §1); ``logits``: the first answer token's logits ``(B, V)``.
    With ``return_maps``: ``maps (B, Lc, H, Nmax)`` question-prompt maps at ``map_layers``,
    ``reference (B, Lc, Nmax)`` head-mean reference maps (NaN beyond each sample's N).
    With ``baseline``: ``baseline_answers`` / ``baseline_tokens`` / ``baseline_logits``
    of plain decoding of the same prompts. ``step_logits``: the ``(B, V)`` float32
    logits of every decoding step (``step_logits[0] == logits``).
    """

    answers: list
    tokens: torch.Tensor
    keep: list
    logits: torch.Tensor
    setting: Setting
    maps: Optional[torch.Tensor] = None
    reference: Optional[torch.Tensor] = None
    map_layers: Optional[list] = None
    baseline_answers: Optional[list] = None
    baseline_tokens: Optional[torch.Tensor] = None
    baseline_logits: Optional[torch.Tensor] = None
    step_logits: Optional[list] = None


@dataclass
class _Prepared:
    """Pass I and the reference suffix of one batch: everything the settings reuse."""

    cache: object
    snap: list
    T: int
    key_mask: torch.Tensor  # (B, T) bool
    pos: torch.Tensor  # (..., B, T) positions the text model used
    last: list  # last real prompt column per sample
    layout: list  # ImageLayout per sample
    first_logits: torch.Tensor  # (B, V) float32, pass I at `last`
    embeds: torch.Tensor  # (B, T, d) text-model input of pass I
    hidden_at: dict  # layer -> (B, T, d) input of that layer in pass I
    maps: torch.Tensor  # (B, Lc, H, Nmax), row-major
    reference: Optional[torch.Tensor]  # (B, Lc, Nmax)
    cap_layers: list
    history: Optional[torch.Tensor] = None  # (B, T) prompt ids the repetition penalty counts

    @property
    def text_start(self) -> list:
        """Per sample, the first column after the image."""
        return [l.key_start + l.N for l in self.layout]

    @property
    def span_len(self) -> list:
        return [l.N for l in self.layout]


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _original_size(image) -> Optional[tuple]:
    """``(width, height)`` of a PIL image, an ``(H, W[, C])`` numpy array or a
    ``([C,] H, W)`` tensor (the layouts processors take); None when it cannot be told."""
    size = getattr(image, "size", None)
    if isinstance(size, tuple) and len(size) == 2:  # PIL
        return size
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) == 2:
        return int(shape[1]), int(shape[0])
    if len(shape) == 3:
        channels_last = shape[-1] in (1, 3, 4) and not (isinstance(image, torch.Tensor) and shape[0] in (1, 3, 4))
        h, w = shape[:2] if channels_last else shape[1:]
        return int(w), int(h)
    return None


class VGRefine:
    """VGRefine on a loaded vision-language model (HF LLaVA / LLaVA-NeXT / Qwen2-VL /
    Qwen2.5-VL, LLaVA-codebase splices such as HuatuoGPT-Vision, VILA).

    Parameters
    ----------
    model, processor
        The model (eval mode) and its processor (``processor(images=..., text=...)``).
    heads
        Ranked ``(layer, head)`` pairs: a preset name (:mod:`vgkernels.presets`), a
        ``heads.json`` path, or a list. ``top_k`` keeps the first K (default: all).
    layers
        Knockout layers (0-based decoder layer indices).
    percentile
        ``p``: image tokens whose triage score is below the p-th percentile are knocked out.
    mode
        ``"renorm"`` (the authors' additive mask) or ``"zero"``.
    reference_prompt
        The generic prompt whose maps divide the question maps (``None``: no division).
    prompt
        ``text -> full prompt string`` with the image placeholder; default: the
        processor's chat template with one image followed by ``text``.
    max_new_tokens
        Decoding length (closed-ended answers are short).
    do_sample, temperature, top_p, repetition_penalty, seed, sample_top_k
        Decoding as ``model.generate`` takes them (``sample_top_k`` is ``generate``'s
        ``top_k``; :class:`~vgkernels.integrations.continuation.Sampling`); the default
        is greedy. The repetition penalty counts what ``generate`` would:
        the prompt ids for HF VLMs (not their padding, as transformers 5; 4.57 also counts
        the pad id), only generated tokens for the LLaVA codebase (which generates from
        embeddings). ``seed`` seeds every decode (baseline and each
        setting) the same way; draws depend on the batch, as with ``generate``.
    backend
        Kernel backend of the knockout layers (``"auto"``: Triton on CUDA, torch on CPU).
    maps
        ``"last"`` (default): triage reads the last prompt token's maps; ``"question"``:
        the maps averaged over the question rows (the authors' "Q-mode", with which their
        recorded VQA-RAD accuracy was obtained); the reference prompt's maps are then
        averaged over its own text rows.
    reuse_lower_layers
        Skip the layers below the first knockout layer in the knockout pass (exact: those
        rows are unchanged there). ``False`` recomputes the question rows at every layer.
    """

    def __init__(self, model, processor, heads="huatuogpt-vision-7b", layers: Sequence[int] = (16,),
                 percentile: float = 50.0, mode: str = "renorm", reference_prompt: Optional[str] = REFERENCE_PROMPT,
                 *, top_k: Optional[int] = None, prompt: Optional[Callable[[str], str]] = None,
                 max_new_tokens: int = 16, backend: str = "auto", reuse_lower_layers: bool = True,
                 do_sample: bool = False, temperature: float = 1.0, top_p: Optional[float] = None,
                 repetition_penalty: float = 1.0, seed: Optional[int] = None, sample_top_k: Optional[int] = None,
                 maps: str = "last"):
        import inspect

        from vgkernels.integrations import get_shim

        from vgkernels.integrations.patch import CAPTURE_ROWS

        if maps not in CAPTURE_ROWS:
            raise ValueError(f"maps: expected one of {CAPTURE_ROWS}, got {maps!r}")
        self.maps = maps
        self.model, self.processor = model, processor
        self._shim = get_shim(model, processor=processor)
        self.stack = self._shim.text_stack()

        params = inspect.signature(model.forward).parameters
        takes = "logits_to_keep" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
        self._keep_one = {"logits_to_keep": 1} if takes else {}
        self.heads = resolve_heads(heads)
        L = self.stack.num_layers
        H = int(self._text_config().num_attention_heads)
        bad = [(l, h) for l, h in self.heads if not (0 <= l < L and 0 <= h < H)]
        if bad or not self.heads:
            raise ValueError(f"heads: expected (layer, head) pairs with layer < {L} and head < {H}, "
                             f"got {bad or 'an empty list'}")
        self.default = self._setting(top_k, percentile, layers, mode)
        self.reference_prompt = reference_prompt
        self.prompt = prompt or self._chat
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens!r}")
        self.sampling = E.Sampling(bool(do_sample), float(temperature), sample_top_k, top_p,
                                   float(repetition_penalty), seed)
        self.backend = backend
        self.reuse_lower_layers = bool(reuse_lower_layers)
        tok = self.tokenizer
        gc = getattr(model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        if eos is None:
            eos = tok.eos_token_id
        self.eos = [int(e) for e in _as_list(eos) if e is not None]
        pad = tok.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos[0] if self.eos else 0))

    # ------------------------------------------------------------------ helpers

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def _text_config(self):
        cfg = self.stack.decoder.config
        return getattr(cfg, "text_config", None) or cfg

    def _setting(self, k, p, layers, mode) -> Setting:
        L = self.stack.num_layers
        layers = tuple(sorted({int(l) for l in _as_list(layers)}))
        if not layers or any(not 0 <= l < L for l in layers):
            raise ValueError(f"layers: expected a non-empty list of decoder layer indices in [0, {L}), got {layers}")
        if k is not None and not 1 <= int(k) <= len(self.heads):
            raise ValueError(f"k: expected 1..{len(self.heads)} (the number of ranked heads), got {k}")
        if not 0.0 <= float(p) <= 100.0:
            raise ValueError(f"percentile: expected a value in [0, 100], got {p!r}")
        if mode not in ("renorm", "zero"):
            raise ValueError(f"mode: expected 'renorm' or 'zero', got {mode!r}")
        return Setting(None if k is None else int(k), float(p), layers, mode)

    def setting(self, k=None, p=50.0, layers=(16,), mode="renorm") -> Setting:
        """A validated :class:`Setting` for :meth:`sweep`."""
        return self._setting(k, p, layers, mode)

    def _chat(self, text: str) -> str:
        return self._shim.chat_text(self.processor, text)

    def _backend(self, device) -> str:
        if self.backend == "auto":
            return "torch" if device.type != "cuda" else "auto"
        return self.backend

    def _image_token_id(self) -> Optional[int]:
        cfg = self.model.config
        for name in ("image_token_id", "image_token_index"):
            v = getattr(cfg, name, None)
            if v is not None:
                return int(v)
        return None

    def _suffix_ids(self, text: str) -> list:
        """Token ids of the prompt built from ``text`` after its (single) image placeholder."""
        full = self.prompt(text)
        proc = self.processor
        if hasattr(proc, "tokenizer_image_token"):
            ids = list(proc.tokenizer_image_token(full))
            marker = IMAGE_TOKEN_INDEX
        else:
            ids = list(self.tokenizer(full, add_special_tokens=False).input_ids)
            marker = self._image_token_id()
        where = [i for i, t in enumerate(ids) if t == marker]
        if len(where) != 1:
            raise ValueError(f"reference prompt: expected exactly one image placeholder in {full!r}, found {len(where)}")
        return ids[where[0] + 1:]

    def _encode(self, images, texts):
        inputs = self._shim.process(self.processor, images, texts)
        dev = self.stack.embed.weight.device
        return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

    # ------------------------------------------------------------------ pass I + reference

    def _cap_layers(self, settings: Sequence[Setting]) -> list:
        kmax = max(len(self.heads) if s.k is None else s.k for s in settings)
        return sorted({l for l, _ in self.heads[:kmax]})

    @torch.no_grad()
    def prepare(self, images, questions, settings: Sequence[Setting] = ()) -> "_Prepared":
        """Pass I (question prompts, with their maps at the heads' layers) and the reference
        suffix (its head-mean maps), for the batch and every setting in ``settings``.

        Pass I is the plain prefill under :func:`vgkernels.patch_model` (composed: every
        row comes from the model's own attention; only the captured rows are recomputed),
        plus hooks that keep the text model's inputs and the hidden states entering the
        first knockout layer of each setting."""
        from vgkernels.integrations.patch import patch_model

        images, questions = _as_list(images), _as_list(questions)
        if len(images) != len(questions) or not images:
            raise ValueError(f"expected as many images as questions (>= 1), got {len(images)} and {len(questions)}")
        settings = list(settings) or [self.default]
        cap_layers = self._cap_layers(settings)
        firsts = sorted({min(s.layers) for s in settings}) if self.reuse_lower_layers else []
        inputs = self._encode(images, [self.prompt(q) for q in questions])
        sizes = [_original_size(im) for im in images]
        sizes = None if any(z is None for z in sizes) else sizes
        stack = self.stack
        dev = stack.embed.weight.device
        rec: dict = {}

        def dec_hook(mod, args, kwargs):
            if "kw" in rec:
                return
            emb = kwargs.get("inputs_embeds")
            if emb is None:
                raise ValueError("VGRefine: the text model was called without inputs_embeds in the prefill")
            B, T = emb.shape[:2]
            am = kwargs.get("attention_mask")
            km = torch.ones(B, T, dtype=torch.bool, device=emb.device) if am is None else am.bool()
            if km.dim() != 2:
                raise ValueError(f"VGRefine: expected a 2-D attention mask in the prefill, got {tuple(km.shape)}")
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.arange(T, device=emb.device)[None].expand(B, T)
            rec["kw"] = (emb, km, pos)

        def layer_hook(idx):
            def hook(mod, args, kwargs):
                rec.setdefault(idx, args[0] if args else kwargs["hidden_states"])
            return hook

        def out_hook(mod, args, kwargs, output):
            if "hidden" not in rec:
                rec["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        def shape_hook(mod, args, output):
            stack.layer_tuple_len = len(output) if isinstance(output, tuple) else 0

        handles = [stack.decoder.register_forward_pre_hook(dec_hook, with_kwargs=True),
                   stack.decoder.register_forward_hook(out_hook, with_kwargs=True),
                   stack.layers[0].register_forward_hook(shape_hook)]
        handles += [stack.layers[l].register_forward_pre_hook(layer_hook(l), with_kwargs=True) for l in firsts]
        try:
            with patch_model(self.model, capture=cap_layers, processor=self.processor, image_sizes=sizes,
                             backend=self._backend(dev), capture_rows=self.maps) as vg:
                out = self.model(**inputs, use_cache=True, **self._keep_one)
        finally:
            for h in handles:
                h.remove()
        if vg.skipped:
            raise ValueError(f"VGRefine: every question needs exactly one image; {vg.skipped}")
        emb, km, pos = rec["kw"]
        T = km.shape[1]
        last = (T - 1 - torch.flip(km, dims=[1]).to(torch.int8).argmax(dim=1)).tolist()
        # The LM head runs on each sample's last prompt row only (a plain generate's prefill
        # also asks the model for the last position's logits alone).
        first_logits = E.logits_at(stack, rec["hidden"], torch.tensor(last, device=dev))
        cache = E.output_cache(out)
        prep = _Prepared(cache, E.cache_snapshot(cache), T, km, pos, last, list(vg.layout), first_logits, emb,
                         {l: rec[l][:, :T] for l in firsts}, vg.maps, None, cap_layers,
                         self._history(inputs))
        if self.reference_prompt is not None:
            prep.reference = self._reference(prep)
        return prep

    def _history(self, inputs: dict) -> Optional[torch.Tensor]:
        """The prompt ids ``generate`` hands its repetition penalty: the ids of an HF VLM
        (padding excluded, as transformers 5 does), none for the LLaVA codebase."""
        if not self._shim.ids_are_columns or inputs.get("input_ids") is None:
            return None
        ids = inputs["input_ids"]
        am = inputs.get("attention_mask")
        return ids if am is None else torch.where(am.bool(), ids, torch.full_like(ids, -1))

    def _reference(self, prep: _Prepared) -> torch.Tensor:
        """Head-mean maps ``(B, Lc, Nmax)`` of the reference prompt's last token, computed as a
        suffix on pass I's cache: its rows see the columns before each sample's first text
        column (the prefix through the image, shared by both prompts) and each other, at
        positions continuing that column's."""
        stack = self.stack
        ids = self._suffix_ids(self.reference_prompt)
        B, T = prep.key_mask.shape
        dev = prep.key_mask.device
        R = len(ids)
        if R == 0:
            raise ValueError("reference prompt: no tokens follow the image")
        emb = stack.embed(torch.tensor(ids, device=dev)[None].expand(B, R))
        s = torch.tensor(prep.text_start, device=dev)
        pos = E.shift_positions(prep.pos, s, torch.arange(R, device=dev))
        cols = torch.arange(T, device=dev)
        km = torch.cat([prep.key_mask & (cols[None] < s[:, None]), torch.ones(B, R, dtype=torch.bool, device=dev)], 1)
        slots = {l: i for i, l in enumerate(prep.cap_layers)}
        try:
            with E.taken_over(stack.layers, prep.cap_layers, backend=self._backend(dev)) as tk:
                which = dict(rows=[T + R - 1] * B) if self.maps == "last" else dict(row_ranges=[(T, T + R)] * B)
                tk.plan = plan = build_plan(sq=R, sk=T + R, layouts=prep.layout, device=dev, capture_slots=slots,
                                            **which)
                E.run_text(stack, emb, pos, km, prep.cache, first_column=T)
        finally:
            E.cache_restore(prep.cache, prep.snap)
        return plan.capture.maps.mean(dim=2)

    # ------------------------------------------------------------------ triage + knockout

    def keep_mask(self, prep: _Prepared, setting: Setting) -> torch.Tensor:
        """Triage (step I): ``(B, Nmax)`` bool, False beyond each sample's N."""
        heads = self.heads if setting.k is None else self.heads[: setting.k]
        index = {l: i for i, l in enumerate(prep.cap_layers)}
        local = [(index[l], h) for l, h in heads]
        return triage_mask(prep.maps, local, reference=prep.reference, percentile=setting.p)

    @torch.no_grad()
    def knockout_logits(self, prep: _Prepared, keep: torch.Tensor, setting: Setting, *, capture: bool = False):
        """Step II prefill: recompute the question rows with the knockout; leaves the combined
        cache in ``prep.cache``. Returns ``(logits (B, V), maps or None)``; ``capture`` gives
        the maps at ``prep.cap_layers`` (layers below the first knockout layer are reused, not
        recomputed, under ``reuse_lower_layers``: their maps are NaN)."""
        stack = self.stack
        B, T = prep.key_mask.shape
        dev = prep.key_mask.device
        s_min = min(prep.text_start)
        first = min(setting.layers) if self.reuse_lower_layers else 0
        if self.reuse_lower_layers and first not in prep.hidden_at:
            raise ValueError(f"setting {setting.label()}: layer {first} was not prepared; pass the setting to prepare()")
        # Every layer's cache is cut to the first recomputed column (the text model sizes its
        # mask from the cache); the skipped layers get pass I's full columns back afterwards.
        E.cache_restore(prep.cache, prep.snap, length=s_min)
        rows = prep.hidden_at[first][:, s_min:] if first > 0 else prep.embeds[:, s_min:]
        band = BandSpec(setting.layers, keep, setting.mode, prep.text_start, [e + 1 for e in prep.last])
        cap = [l for l in prep.cap_layers if l >= first] if capture else []
        slots = {l: i for i, l in enumerate(prep.cap_layers)}
        with E.taken_over(stack.layers, sorted(set(setting.layers) | set(cap)), backend=self._backend(dev)) as tk, \
                E.skip_layers(stack, first, rows):
            which = dict(rows=prep.last) if self.maps == "last" else \
                dict(row_ranges=list(zip(prep.text_start, [e + 1 for e in prep.last])))
            tk.plan = plan = build_plan(sq=T - s_min, sk=T, layouts=prep.layout, device=dev,
                                        capture_slots={l: slots[l] for l in cap}, band=band, **which)
            hidden = E.run_text(stack, rows, prep.pos[..., s_min:], prep.key_mask, prep.cache, first_column=s_min)
        E.cache_restore(prep.cache, prep.snap, to_layer=first)
        logits = E.logits_at(stack, hidden, torch.tensor(prep.last, device=dev) - s_min)
        maps = None
        if capture:
            maps = torch.full_like(prep.maps, float("nan"))
            if plan.capture is not None and plan.capture.maps is not None:
                got = plan.capture.maps
                for l in cap:
                    maps[:, slots[l]] = got[:, slots[l]]
        return logits, maps

    def _decode(self, prep: _Prepared, first_logits: torch.Tensor, max_new_tokens: int):
        last = torch.tensor(prep.last, device=prep.key_mask.device)
        last_pos = E.shift_positions(prep.pos, last, torch.zeros(1, dtype=torch.long))
        try:
            toks, step_logits = E.decode(self.stack, first_logits, prep.cache, prep.key_mask, last_pos,
                                         max_new_tokens=max_new_tokens, eos=self.eos, pad_id=self.pad_id,
                                         sampling=self.sampling, history=prep.history)
        finally:
            E.cache_restore(prep.cache, prep.snap)
        return toks, step_logits

    def _text(self, toks: torch.Tensor) -> list:
        out = []
        for row in toks.tolist():
            cut = []
            for t in row:
                if t in self.eos:
                    break
                cut.append(t)
            out.append(self.tokenizer.decode(cut, skip_special_tokens=True).strip())
        return out

    # ------------------------------------------------------------------ public calls

    @torch.no_grad()
    def sweep(self, images, questions, settings: Sequence[Setting], *, baseline: bool = False,
              return_maps: bool = False, max_new_tokens: Optional[int] = None) -> list:
        """One :class:`RefineResult` per setting, from a single pass I and reference suffix.

        Settings that give the same keep mask and layers share their decoding.
        """
        settings = [self._setting(s.k, s.p, s.layers, s.mode) if isinstance(s, Setting) else self.setting(*s)
                    for s in settings]
        if not settings:
            raise ValueError("settings: expected at least one Setting")
        G = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        prep = self.prepare(images, questions, settings)
        base = None
        if baseline:
            bt, bl = self._decode(prep, prep.first_logits, G)
            base = (self._text(bt), bt, prep.first_logits)
        results, memo = [], {}
        for st in settings:
            keep = self.keep_mask(prep, st)
            key = (keep.cpu().numpy().tobytes(), st.layers, st.mode)
            if key not in memo:
                logits, _ = self.knockout_logits(prep, keep, st)
                toks, step_logits = self._decode(prep, logits, G)
                memo[key] = (toks, logits, step_logits)
            toks, logits, step_logits = memo[key]
            keeps = [keep[b, : int(prep.span_len[b])].cpu() for b in range(keep.shape[0])]
            r = RefineResult(self._text(toks), toks, keeps, logits, st, step_logits=step_logits)
            if return_maps:
                r.maps, r.reference, r.map_layers = prep.maps, prep.reference, list(prep.cap_layers)
            if base is not None:
                r.baseline_answers, r.baseline_tokens, r.baseline_logits = base
            results.append(r)
        return results

    def __call__(self, images, questions, *, baseline: bool = False, return_maps: bool = False,
                 max_new_tokens: Optional[int] = None) -> RefineResult:
        """VGRefine answers for a batch (one image per question)."""
        return self.sweep(images, questions, [self.default], baseline=baseline, return_maps=return_maps,
                          max_new_tokens=max_new_tokens)[0]

    @staticmethod
    def grid(k: Sequence = (None,), p: Sequence = (50.0,), layers: Sequence = ((16,),), mode: str = "renorm"):
        """The settings of a ``K × p × layers`` grid (unvalidated; :meth:`sweep` checks them)."""
        out = []
        for kk, pp, ll in itertools.product(k, p, layers):
            out.append(Setting(None if kk is None else int(kk), float(pp), tuple(sorted(_as_list(ll))), mode))
        return out
