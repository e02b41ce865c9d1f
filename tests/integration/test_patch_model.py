"""patch_model on every family (tiny models from configs, CPU, backend="torch").

Each test compares against a reference computed without vgkernels: the unpatched model,
its eager twin's ``output_attentions=True`` rows, or the eager twin with the authors'
additive knockout mask (see ``tests/tiny_models.py``).
"""
from __future__ import annotations

import pytest
import torch

import vgkernels
from vgkernels import KnockoutPlan, patch_model
from vgkernels.integrations.takeover import ATTN_KEY

from tiny_models import (ALL_NAMES, MAP_TOL, PROMPTS, SIZES, TOL, decoder_layers, eager_rows, expected_spans, generate,
                       is_splice, knockout_reference, logits_of, make_inputs, models)

BACKEND = "torch"


def _one(name, i=0):
    model, proc, ref = models(name)
    return model, proc, ref, make_inputs(name, proc, [PROMPTS[i]], [SIZES[i]])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_capture_logits_and_maps_match_eager_rows(name):
    model, proc, ref, inp = _one(name)
    base = logits_of(model, inp)
    spans, mask = expected_spans(name, model, inp)
    with patch_model(model, capture="all", backend=BACKEND) as vg:
        got = logits_of(model, inp)
        maps = vg.maps.clone()
    torch.testing.assert_close(got, base, **TOL)
    rows, _ = eager_rows(name, ref, inp, spans, mask)
    L = len(decoder_layers(name, model))
    assert vg.layers == list(range(L))
    assert maps.shape == rows.shape and maps.dtype == torch.float32
    assert not torch.isnan(maps).any()
    torch.testing.assert_close(maps, rows, **MAP_TOL)
    assert [(l.key_start, l.N) for l in vg.layout] == spans
    # an image row of a softmax: the captured mass over the image is below 1 and positive
    assert bool((maps.sum(-1) > 0).all()) and bool((maps.sum(-1) <= 1 + 1e-6).all())


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-splice-vila"])
def test_layout_only_patch_touches_no_layer(name):
    """capture=None without a knockout records the layout and leaves every layer alone."""
    model, proc, ref, inp = _one(name)
    base = logits_of(model, inp)
    spans, _ = expected_spans(name, model, inp)
    originals = [l.self_attn.config for l in decoder_layers(name, model)]
    with patch_model(model, capture=None, backend=BACKEND) as vg:
        got = logits_of(model, inp)
        assert all(l.self_attn.config is c for l, c in zip(decoder_layers(name, model), originals))
    assert torch.equal(got, base)
    assert vg.maps is None and vg.layers == [] and vg.calls == {}
    assert [(l.key_start, l.N) for l in vg.layout] == spans
    with patch_model(model, capture=[0], backend=BACKEND) as vg_cap:
        logits_of(model, inp)
    for a, b in zip(vg.layout, vg_cap.layout):
        assert a.grid == b.grid and torch.equal(a.cells.nan_to_num(-1), b.cells.nan_to_num(-1))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_unpatch_is_bit_identical(name):
    model, proc, ref, inp = _one(name, 1)
    before = logits_of(model, inp)
    keep = torch.rand(1, expected_spans(name, model, inp)[0][0][1]) > 0.5
    vg = patch_model(model, capture=[0, 2], knockout=KnockoutPlan([1], keep), backend=BACKEND)
    patched = logits_of(model, inp)
    vg.unpatch()
    after = logits_of(model, inp)
    assert torch.equal(before, after)
    assert not torch.equal(before, patched)  # the knockout did change something
    for layer in decoder_layers(name, model):
        assert layer.self_attn.config._attn_implementation == "sdpa"
        assert "_vg_takeover" not in layer.self_attn.__dict__
    assert "generate" not in model.__dict__
    vg.unpatch()  # idempotent


@pytest.mark.parametrize("mode", ["renorm", "zero"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_knockout_matches_authors_additive_mask(name, mode, gen):
    model, proc, ref, inp = _one(name, 2)
    spans, mask = expected_spans(name, model, inp)
    n = spans[0][1]
    keep = torch.rand(1, n, generator=gen) > 0.5
    layers = [1, 3]
    with patch_model(model, capture="all", knockout=KnockoutPlan(layers, keep, mode=mode), backend=BACKEND) as vg:
        got = logits_of(model, inp)
        maps = vg.maps.clone()
    with knockout_reference(name, ref, inp, layers, keep, mode=mode):
        rows, want = eager_rows(name, ref, inp, spans, mask)
    torch.testing.assert_close(got, want, **TOL)
    # The captured row is the last prompt token, a knocked-out query row: its applied
    # probabilities are zero on dropped tokens at the knockout layers.
    torch.testing.assert_close(maps, rows, **MAP_TOL)
    for l in layers:
        assert bool((maps[0, l][:, ~keep[0]] == 0).all())
    assert not torch.allclose(got, logits_of(model, inp), atol=1e-4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_padded_batch_equals_single_runs(name, padding_side):
    model, proc, ref = models(name)
    if is_splice(name):
        # the splice pads after splicing; its side is the model's choice
        model.config.tokenizer_padding_side = padding_side
    try:
        batch = make_inputs(name, proc, PROMPTS, SIZES, padding_side=padding_side)
        spans, mask = expected_spans(name, model, batch)
        Nb = [n for _, n in spans]
        n_max = max(Nb)
        keep = torch.rand(3, n_max) > 0.3
        plan = KnockoutPlan([2], keep)
        with patch_model(model, capture="all", knockout=plan, backend=BACKEND) as vg:
            blog = logits_of(model, batch)
            bmaps = vg.maps.clone()
            assert [l.N for l in vg.layout] == Nb
            for b in range(3):
                single = make_inputs(name, proc, [PROMPTS[b]], [SIZES[b]], seed=b)
                vg.knockout = KnockoutPlan([2], keep[b: b + 1, : Nb[b]])
                slog = logits_of(model, single)
                smask = expected_spans(name, model, single)[1][0]
                torch.testing.assert_close(bmaps[b, :, :, : Nb[b]], vg.maps[0], **MAP_TOL)
                assert bool(torch.isnan(bmaps[b, :, :, Nb[b]:]).all())
                torch.testing.assert_close(blog[b][mask[b]], slog[0][smask], atol=5e-5, rtol=1e-4)
                vg.knockout = plan
    finally:
        if is_splice(name):
            model.config.tokenizer_padding_side = "right"


@pytest.mark.parametrize("name", ALL_NAMES)
def test_generate_under_capture_and_knockout(name, gen):
    model, proc, ref = models(name)
    if is_splice(name):
        model.config.tokenizer_padding_side = "left"
        ref.config.tokenizer_padding_side = "left"
    try:
        inp = make_inputs(name, proc, PROMPTS[:2], SIZES[:2], padding_side="left")
        spans, mask = expected_spans(name, model, inp)
        n_max = max(n for _, n in spans)
        want_plain = generate(name, ref, inp)
        with patch_model(model, capture="all", backend=BACKEND) as vg:
            got = generate(name, model, inp)
            maps_gen = vg.maps.clone()
            calls = dict(vg.calls)
            logits_of(model, inp)
            maps_fwd = vg.maps.clone()
        assert torch.equal(got, want_plain)
        # maps come from the prefill only: decode steps ran (more calls) but did not overwrite them
        assert all(c == 4 for c in calls.values())
        torch.testing.assert_close(maps_gen, maps_fwd, **MAP_TOL)
        keep = torch.rand(2, n_max, generator=gen) > 0.5
        for queries in ("prompt", "prompt+generated"):
            plan = KnockoutPlan([0, 2], keep, mode="renorm", queries=queries)
            with patch_model(model, capture=None, knockout=plan, backend=BACKEND):
                got = generate(name, model, inp)
            with knockout_reference(name, ref, inp, [0, 2], keep, queries=queries):
                want = generate(name, ref, inp)
            assert torch.equal(got, want), queries
    finally:
        if is_splice(name):
            model.config.tokenizer_padding_side = "right"
            ref.config.tokenizer_padding_side = "right"


@pytest.mark.parametrize("execution", ["composed", "fused"])
@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-splice"])
def test_only_chosen_layers_use_vgkernels(name, execution, monkeypatch):
    """Only the chosen layers go through vgkernels. Composed: they still run the model's own
    sdpa for their ordinary rows; fused: they run vgkernels alone."""
    from transformers import AttentionInterface

    model, proc, ref, inp = _one(name)
    layers = decoder_layers(name, model)
    originals = [l.self_attn.config for l in layers]
    vision_cfg_before = None if is_splice(name) else model.config.vision_config._attn_implementation
    sdpa_modules = []
    real_sdpa = AttentionInterface._global_mapping["sdpa"]

    def spy(module, *a, **kw):
        sdpa_modules.append(module)
        return real_sdpa(module, *a, **kw)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy)
    keep = torch.ones(1, expected_spans(name, model, inp)[0][0][1], dtype=torch.bool)
    keep[0, ::2] = False  # a knockout that drops something (keep-all is left to the model)
    with patch_model(model, capture=[1], knockout=KnockoutPlan([2], keep), backend=BACKEND,
                     execution=execution) as vg:
        logits_of(model, inp)
        for i, l in enumerate(layers):
            if i in (1, 2):
                assert l.self_attn.config._attn_implementation == ATTN_KEY
                assert l.self_attn.config is not originals[i]
            else:
                assert l.self_attn.config is originals[i]
        assert model.config._attn_implementation if not is_splice(name) else True
        if not is_splice(name):
            assert model.config.vision_config._attn_implementation == vision_cfg_before
    assert vg.calls == {1: 1, 2: 1}
    text_attn = {id(l.self_attn): i for i, l in enumerate(layers)}
    text_sdpa = sorted(text_attn[id(m)] for m in sdpa_modules if id(m) in text_attn)
    assert text_sdpa == ([0, 1, 2, 3] if execution == "composed" else [0, 3])
    if not is_splice(name):
        # the vision tower kept sdpa too
        assert any(id(m) not in text_attn for m in sdpa_modules)


@pytest.mark.parametrize("registered", [True, False])
def test_model_wide_key_keeps_padding_through_the_mask_function(registered, monkeypatch):
    """If the text model's own implementation is the vgkernels key, transformers builds its
    mask with the mask function registered for that key; without one it builds none and a
    left-padded batch silently attends to its padding."""
    from transformers.masking_utils import AttentionMaskInterface

    from vgkernels.integrations.tiny import build_tiny

    model, proc = build_tiny("tiny-llava", seed=1)
    model.model.language_model.config.__dict__["_attn_implementation_internal"] = ATTN_KEY
    batch = make_inputs("tiny-llava", proc, PROMPTS, SIZES)
    with patch_model(model, capture="all", backend=BACKEND) as vg:
        if not registered:
            monkeypatch.delitem(AttentionMaskInterface._global_mapping, ATTN_KEY)
        logits_of(model, batch)
        bmaps = vg.maps.clone()
        single = make_inputs("tiny-llava", proc, [PROMPTS[0]], [SIZES[0]])
        logits_of(model, single)
        same = torch.allclose(bmaps[0], vg.maps[0], **{k: v for k, v in MAP_TOL.items() if k != "equal_nan"})
    assert same == registered
