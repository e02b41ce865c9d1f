"""Capture is passive, and composed execution is exact (SPEC §5, issue 10 §2-§3).

- Composed capture-only forwards and ``generate`` are bit-identical to the unpatched
  model (every row comes from the model's own attention), and composed/fused agree.
- Where capture cannot apply, the layers pass through, the maps are NaN and
  ``vg.skipped`` says why; a knockout raises instead.
- ``generate`` variants (beams, several return sequences, assisted decoding, a pre-filled cache) and ``output_attentions`` behave as unpatched.
- A patched layer never reads a tensor value on the host.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

from vgkernels import KnockoutPlan, patch_model
from vgkernels.integrations.takeover import Takeover

from tiny_models import (ALL_NAMES, MAP_TOL, PROMPTS, SIZES, TOL, eager_rows, expected_spans, is_splice,
                      knockout_reference, logits_of, make_inputs, models)

BACKEND = "torch"


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


def _maps_of(model, inp, **kw):
    with patch_model(model, capture="all", backend=BACKEND, **kw) as vg:
        logits_of(model, inp)
    return vg.maps.clone()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_composed_capture_is_bit_identical_and_fused_agrees(name, gen):
    model, proc, ref = models(name)
    inp = make_inputs(name, proc, PROMPTS[:2], SIZES[:2], padding_side="left")
    base = logits_of(model, inp)
    with patch_model(model, capture="all", backend=BACKEND) as vg:
        got = logits_of(model, inp)
        composed = vg.maps.clone()
    assert torch.equal(got, base)
    assert vg.execution == "composed" and not vg.skipped
    spans, _ = expected_spans(name, model, inp)
    keep = torch.rand(2, max(n for _, n in spans), generator=gen) > 0.4
    plan = KnockoutPlan([1, 3], keep)
    res = {}
    for execution in ("composed", "fused"):
        with patch_model(model, capture="all", knockout=plan, backend=BACKEND, execution=execution) as vg:
            res[execution] = (logits_of(model, inp), vg.maps.clone())
        if execution == "fused":
            fused_plain = _maps_of(model, inp, execution="fused")
    torch.testing.assert_close(res["composed"][0], res["fused"][0], **TOL)
    torch.testing.assert_close(res["composed"][1], res["fused"][1], **MAP_TOL)
    torch.testing.assert_close(composed, fused_plain, **MAP_TOL)
    # and the knockout is real: knocked-out tokens get no attention from the captured row
    for l in (1, 3):
        for b, (_, n) in enumerate(spans):
            assert bool((res["composed"][1][b, l, :, :n][:, ~keep[b, :n]] == 0).all())


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-splice"])
def test_capture_generate_is_bit_identical(name):
    model, proc, _ = models(name)
    inp = make_inputs(name, proc, PROMPTS[:1], SIZES[:1])
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        want = model.generate(**inp, **kw)
        with patch_model(model, capture="all", backend=BACKEND) as vg:
            got = model.generate(**inp, **kw)
    assert torch.equal(got, want)
    assert not torch.isnan(vg.maps).any()


def test_layers_never_read_tensors_on_the_host(monkeypatch, gen):
    """Within a patched layer (capture and a knockout band, composed and fused) nothing
    reads a tensor value back — neither the takeover, nor the kernel backend, nor the
    model's own attention: the plan was built before the first layer ran."""
    model, proc, _ = models("tiny-llava")
    inp = make_inputs("tiny-llava", proc, PROMPTS, SIZES, padding_side="right")
    spans, _ = expected_spans("tiny-llava", model, inp)
    keep = torch.rand(3, max(n for _, n in spans), generator=gen) > 0.5
    reads = []
    depth = [0]
    real_attend = Takeover.attend

    def attend(self, *a, **k):
        depth[0] += 1
        try:
            return real_attend(self, *a, **k)
        finally:
            depth[0] -= 1

    def spy(name):
        real = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            if depth[0]:
                reads.append((name, sys._getframe(1).f_code.co_filename))
            return real(self, *a, **k)
        return f

    monkeypatch.setattr(Takeover, "attend", attend)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    for execution in ("composed", "fused"):
        with patch_model(model, capture="all", knockout=KnockoutPlan([1, 2], keep), backend=BACKEND,
                         execution=execution) as vg:
            logits_of(model, inp)
        assert vg.calls == {0: 1, 1: 1, 2: 1, 3: 1}
    assert reads == []


def test_inputs_embeds_only_and_ids_without_pixels_pass_through():
    model, proc, _ = models("tiny-llava")
    inp = make_inputs("tiny-llava", proc, PROMPTS[:1], SIZES[:1])
    emb = model.get_input_embeddings()(inp["input_ids"])
    with torch.no_grad():
        want = model(inputs_embeds=emb, attention_mask=inp["attention_mask"]).logits
        with patch_model(model, capture="all", backend=BACKEND) as vg, pytest.warns(UserWarning, match="input_ids"):
            got = model(inputs_embeds=emb, attention_mask=inp["attention_mask"]).logits
    assert torch.equal(got, want) and "input_ids" in vg.skipped[0][1]
    # image-token ids without pixels: the model reads them as text
    text_only = {"input_ids": inp["input_ids"], "attention_mask": inp["attention_mask"]}
    want = logits_of(model, text_only)
    with patch_model(model, capture="all", backend=BACKEND) as vg, pytest.warns(UserWarning, match="pixel"):
        got = logits_of(model, text_only)
    assert torch.equal(got, want) and vg.skipped == [(0, vg.skipped[0][1])] and "pixel" in vg.skipped[0][1]
    assert bool(torch.isnan(vg.maps).all())
    with patch_model(model, capture=None, knockout=KnockoutPlan([1], torch.ones(1, 16, dtype=torch.bool)),
                     backend=BACKEND):
        with pytest.raises(ValueError, match="pixel"):
            logits_of(model, text_only)


def test_packed_sequences_pass_through():
    """Two prompts packed in one row (position_ids restart, no attention mask)."""
    model, proc, _ = models("tiny-llava")
    ids = proc.tokenizer(["USER: hello there ASSISTANT: hi"], return_tensors="pt").input_ids
    packed = torch.cat([ids, ids], dim=1)
    pos = torch.cat([torch.arange(ids.shape[1]), torch.arange(ids.shape[1])])[None]
    with torch.no_grad():
        want = model(input_ids=packed, position_ids=pos).logits
        with patch_model(model, capture="all", backend=BACKEND) as vg, pytest.warns(UserWarning, match="packed"):
            got = model(input_ids=packed, position_ids=pos).logits
    assert torch.equal(got, want) and "packed" in vg.skipped[0][1]


def test_compiled_forward_passes_through():
    """Under torch.compile a patched layer runs its own implementation and touches no
    state (no recompilation): a compiled generate() (its prefill runs eagerly on a static
    cache) gives the unpatched tokens and says why in vg.skipped; a compiled forward leaves
    the handle alone. A knockout refuses."""
    from transformers import CompileConfig

    model, proc, _ = models("tiny-llava")
    inp = make_inputs("tiny-llava", proc, PROMPTS[:1], SIZES[:1])
    want = logits_of(model, inp)
    cc = CompileConfig(backend="eager", fullgraph=True, dynamic=False)
    cc._compile_all_devices = True
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, cache_implementation="static", compile_config=cc)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            plain = model.generate(**inp, **kw)
            with patch_model(model, capture="all", backend=BACKEND) as vg, pytest.warns(UserWarning, match="Static"):
                got = model.generate(**inp, **kw)
        assert torch.equal(got, plain)
        assert vg.skipped and "StaticCache" in vg.skipped[0][1] and bool(torch.isnan(vg.maps).all())
        compiled = torch.compile(model.forward, backend="eager")
        with patch_model(model, capture="all", backend=BACKEND) as vg, torch.no_grad():
            torch.testing.assert_close(compiled(**inp).logits, want, atol=0, rtol=0)
        assert vg.maps is None and vg.calls == {}
        keep = torch.ones(1, 16, dtype=torch.bool)
        with patch_model(model, capture=None, knockout=KnockoutPlan([1], keep), backend=BACKEND):
            with pytest.raises(ValueError, match="dynamic KV cache"), torch.no_grad():
                model.generate(**inp, **kw)
    finally:
        torch._dynamo.reset()


def test_output_attentions_are_what_the_model_returns(gen):
    """The eager twin: capture-only returns the unpatched weights bit for bit; with a
    knockout the knocked-out rows hold the probabilities actually applied (the authors'
    additive-mask reference) and every other row is unchanged."""
    name = "tiny-llava"
    _, proc, ref = models(name)
    inp = make_inputs(name, proc, PROMPTS[1:3], SIZES[1:3], padding_side="left")
    with torch.no_grad():
        want = ref(**inp, output_attentions=True).attentions
        with patch_model(ref, capture="all", backend=BACKEND):
            got = ref(**inp, output_attentions=True).attentions
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    spans, _ = expected_spans(name, ref, inp)
    keep = torch.rand(2, max(n for _, n in spans), generator=gen) > 0.5
    with knockout_reference(name, ref, inp, [2], keep):
        with torch.no_grad():
            ko_want = ref(**inp, output_attentions=True).attentions
    for execution in ("composed", "fused"):
        with patch_model(ref, capture=None, knockout=KnockoutPlan([2], keep), backend=BACKEND,
                         execution=execution), torch.no_grad():
            ko_got = ref(**inp, output_attentions=True).attentions
        for l in (0, 1):  # below the knockout nothing changes
            assert torch.equal(ko_got[l], want[l])
        for l in (2, 3):  # the knockout layer's rows, and what follows from them
            torch.testing.assert_close(ko_got[l], ko_want[l], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(ko_got[2], want[2], atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-splice"])
def test_beams_and_return_sequences_give_maps_per_input_sample(name, gen):
    model, proc, ref = models(name)
    if is_splice(name):
        model.config.tokenizer_padding_side = ref.config.tokenizer_padding_side = "left"
    try:
        inp = make_inputs(name, proc, PROMPTS[:2], SIZES[:2], padding_side="left")
        kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
        with torch.no_grad():
            want = model.generate(**inp, **kw)
        with patch_model(model, capture="all", backend=BACKEND) as vg, torch.no_grad():
            got = model.generate(**inp, **kw)
        assert torch.equal(got, want)
        torch.testing.assert_close(vg.maps, _maps_of(model, inp), **MAP_TOL)
        assert len(vg.layout) == 2
        spans, _ = expected_spans(name, model, inp)
        keep = torch.rand(2, max(n for _, n in spans), generator=gen) > 0.5
        with patch_model(model, capture=None, knockout=KnockoutPlan([1], keep), backend=BACKEND), torch.no_grad():
            got = model.generate(**inp, **kw)
        with knockout_reference(name, ref, inp, [1], keep), torch.no_grad():
            want = ref.generate(**inp, **kw)
        assert torch.equal(got, want)
    finally:
        if is_splice(name):
            model.config.tokenizer_padding_side = ref.config.tokenizer_padding_side = "right"


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_assisted_decoding_and_logits_to_keep(name):
    """Assisted decoding (the eager twin drafts, the patched model verifies several tokens
    per call) and a forward with logits_to_keep: capture is unchanged."""
    model, proc, ref = models(name)
    inp = make_inputs(name, proc, [PROMPTS[1]], [SIZES[1]])
    kw = dict(max_new_tokens=6, do_sample=False, assistant_model=ref)
    with torch.no_grad():
        want = model.generate(**inp, **kw)
        with patch_model(model, capture="all", backend=BACKEND) as vg:
            got = model.generate(**inp, **kw)
            maps = vg.maps.clone()
            model(**inp, logits_to_keep=1)
    assert torch.equal(got, want)
    torch.testing.assert_close(maps, _maps_of(model, inp), **MAP_TOL)
    torch.testing.assert_close(vg.maps, maps, **MAP_TOL)


def test_generate_continuing_a_filled_cache():
    """generate() on a cache that already holds the image: the prompt call covers the rest
    of the prompt; its captured row sees the cached image keys. (The pixels are not passed
    again: the image was encoded into the cache.)"""
    from transformers import DynamicCache

    model, proc, _ = models("tiny-llava")
    inp = make_inputs("tiny-llava", proc, [PROMPTS[2]], [SIZES[2]])
    spans, _ = expected_spans("tiny-llava", model, inp)
    ks, n = spans[0]
    cut = ks + n + 2  # the image and two text tokens are cached
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=inp["input_ids"][:, :cut], attention_mask=inp["attention_mask"][:, :cut],
              pixel_values=inp["pixel_values"], past_key_values=cache, use_cache=True)
        want = model.generate(**inp, **kw)
        text = {"input_ids": inp["input_ids"], "attention_mask": inp["attention_mask"]}
        with patch_model(model, capture="all", backend=BACKEND) as vg:
            got = model.generate(**text, past_key_values=cache, **kw)
    assert torch.equal(got, want)
    torch.testing.assert_close(vg.maps, _maps_of(model, inp), **MAP_TOL)
    keep = torch.ones(1, n, dtype=torch.bool)
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=inp["input_ids"][:, :cut], attention_mask=inp["attention_mask"][:, :cut],
              pixel_values=inp["pixel_values"], past_key_values=cache, use_cache=True)
        with patch_model(model, capture=None, knockout=KnockoutPlan([1], keep), backend=BACKEND):
            with pytest.raises(ValueError, match="already holds"):
                model.generate(**text, past_key_values=cache, **kw)


def test_llava_next_placement_ignores_the_attention_mask():
    model, proc, _ = models("tiny-llava-next")
    inp = make_inputs("tiny-llava-next", proc, PROMPTS[:1], SIZES[:1])
    with patch_model(model, capture=None, backend=BACKEND) as vg:
        logits_of(model, inp)
        plain = list(vg.layout)
        holed = dict(inp)
        holed["attention_mask"] = inp["attention_mask"].clone()
        holed["attention_mask"][0, plain[0].key_start + 3] = 0  # a masked image position
        logits_of(model, holed)
    assert [(l.key_start, l.N) for l in vg.layout] == [(l.key_start, l.N) for l in plain]


def test_several_images_capture_passes_through_others_are_captured():
    """A batch where one sample has no image: that sample is skipped, the other captured."""
    model, proc, _ = models("tiny-llava")
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}],
            [{"role": "user", "content": [{"type": "text", "text": PROMPTS[1]}]}]]
    texts = [proc.apply_chat_template(m, add_generation_prompt=True) for m in msgs]
    from vgkernels.integrations.tiny import test_image

    inp = proc(images=[test_image(*SIZES[0])], text=texts, return_tensors="pt", padding=True)
    want = logits_of(model, inp)
    with patch_model(model, capture="all", backend=BACKEND) as vg, pytest.warns(UserWarning, match="no image"):
        got = logits_of(model, inp)
    assert torch.equal(got, want)
    assert [s for s, _ in vg.skipped] == [1] and vg.layout[1] is None and vg.layout[0] is not None
    assert bool(torch.isnan(vg.maps[1]).all()) and not bool(torch.isnan(vg.maps[0]).any())
    single = make_inputs("tiny-llava", proc, PROMPTS[:1], SIZES[:1])
    torch.testing.assert_close(vg.maps[0], _maps_of(model, single)[0], **MAP_TOL)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-splice"])
def test_deep_copy_of_a_patched_model_is_an_unpatched_model(name):
    """transformers' own tests deep-copy models: the copy runs (and generates) exactly as the
    unpatched model, the original stays patched, and either can be patched again."""
    import copy

    model, proc, _ = models(name)
    inp = make_inputs(name, proc, PROMPTS[:1], SIZES[:1])
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    base = logits_of(model, inp)
    with torch.no_grad():
        want = model.generate(**inp, **kw)
    with patch_model(model, capture="all", backend=BACKEND) as vg:
        twin = copy.deepcopy(model)
        assert torch.equal(logits_of(twin, inp), base)
        with torch.no_grad():
            assert torch.equal(twin.generate(**inp, **kw), want)
        assert vg.calls == {}  # the copy never called into the original's takeover
        logits_of(model, inp)
        assert not torch.isnan(vg.maps).any()
        with patch_model(twin, capture="all", backend=BACKEND) as vg_twin:
            assert torch.equal(logits_of(twin, inp), base)
        torch.testing.assert_close(vg_twin.maps, vg.maps, **MAP_TOL)
    assert torch.equal(logits_of(twin, inp), base) and torch.equal(logits_of(model, inp), base)
