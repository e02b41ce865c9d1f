"""Plans at their edges: a knockout where some samples drop nothing (the band covers only
the others), a larger image beyond the band's last key, a padding hole inside the image,
captured rows already in the KV cache, and two handles unpatched out of order. Each is
checked against the eager twin (``output_attentions`` under the dense-mask knockout)."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from vgkernels import KnockoutPlan, patch_model
from vgkernels.integrations.tiny import test_image as draw_image

from tiny_models import (MAP_TOL, PROMPTS, SIZES, eager_rows, expected_spans, knockout_reference, logits_of,
                         make_inputs, models)
from test_capture_rows import eager_question_maps

EXECUTIONS = ["composed", "fused"]


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("mode", ["renorm", "zero"])
def test_question_maps_when_one_sample_drops_nothing(execution, mode, gen):
    """Sample 0 keeps every token and has the longer question, so the question rows reach
    past the band (sample 1's rows): their log-sum-exp must still carry the knockout."""
    name = "tiny-llava"
    model, proc, ref = models(name, num_layers=2)
    inp = make_inputs(name, proc, ["Describe the image in detail, please.", "What?"], SIZES[:2],
                      padding_side="right")
    spans, mask = expected_spans(name, model, inp)
    keep = torch.rand(2, max(n for _, n in spans), generator=gen) > 0.5
    keep[0] = True
    with patch_model(model, capture="all", capture_rows="question", knockout=KnockoutPlan([1], keep, mode=mode),
                     backend="torch", execution=execution) as vg, torch.no_grad():
        model(**inp)
    with knockout_reference(name, ref, inp, [1], keep, mode=mode):
        want = eager_question_maps(name, ref, inp, spans, mask)
    torch.testing.assert_close(vg.maps, want, **MAP_TOL)


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("text", ["ab", "abcdefghij"])
def test_larger_image_past_the_band(execution, text):
    """Right padding; sample 0 has the larger image and drops nothing, sample 1 (small
    image, short text) is the band: sample 0's image lies beyond the band's last key."""
    name = "tiny-qwen2-vl"
    model, proc, ref = models(name, num_layers=2)
    img = "<|vision_start|><|image_pad|><|vision_end|>"
    proc.tokenizer.padding_side = "right"
    try:
        inp = proc(images=[draw_image(100, 100), draw_image(40, 40, seed=1)], text=[img + "a", img + text],
                   return_tensors="pt", padding=True)
    finally:
        proc.tokenizer.padding_side = "left"
    spans, mask = expected_spans(name, model, inp)
    # sample 1's last row (the band's end, right padding) comes before sample 0's image ends
    assert spans[0][1] > spans[1][1] and int(mask[1].sum()) < spans[0][0] + spans[0][1]
    keep = torch.ones(2, max(n for _, n in spans), dtype=torch.bool)
    keep[1, ::2] = False
    with knockout_reference(name, ref, inp, [1], keep):
        rows, want = eager_rows(name, ref, inp, spans, mask)
    with patch_model(model, capture="all", knockout=KnockoutPlan([1], keep), backend="torch",
                     execution=execution) as vg, torch.no_grad():
        got = model(**inp).logits
    torch.testing.assert_close(got[mask], want[mask], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(vg.maps, rows, **MAP_TOL)


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("capture_rows", ["last", "question"])
def test_padding_hole_inside_the_image(execution, capture_rows):
    """An image key masked out in ``attention_mask`` (LLaVA still places the image there)
    has probability 0 in eager attention: in both capture modes too."""
    name = "tiny-llava"
    model, proc, ref = models(name, num_layers=2)
    inp = make_inputs(name, proc, PROMPTS[:1], SIZES[:1])
    spans, _ = expected_spans(name, model, inp)
    ks, _ = spans[0]
    holed = dict(inp, attention_mask=inp["attention_mask"].clone())
    holed["attention_mask"][0, ks + 3] = 0
    mask = holed["attention_mask"].bool()
    if capture_rows == "question":
        want = eager_question_maps(name, ref, holed, spans, mask)
    else:
        want, _ = eager_rows(name, ref, holed, spans, mask)
    assert bool((want[0, :, :, 3] == 0).all())
    with patch_model(model, capture="all", capture_rows=capture_rows, backend="torch",
                     execution=execution) as vg, torch.no_grad():
        model(**holed)
    torch.testing.assert_close(vg.maps, want, **MAP_TOL)


@pytest.mark.parametrize("capture_rows", ["last", "question"])
def test_captured_rows_in_the_cache_are_reported(capture_rows):
    """generate() continuing a cache that already holds rows to capture: for ``question``
    the image and the first question tokens; for ``last`` the whole prompt, followed by
    one right-padding column. Rows computed before the call cannot be captured: their
    maps are NaN, the sample is in ``vg.skipped`` with the reason, one warning."""
    name = "tiny-llava"
    model, proc, _ = models(name, num_layers=2)
    inp = make_inputs(name, proc, [PROMPTS[2]], [SIZES[2]])
    spans, _ = expected_spans(name, model, inp)
    ks, n = spans[0]
    ids, am = inp["input_ids"], inp["attention_mask"]
    cut = ks + n + 2 if capture_rows == "question" else ids.shape[1]
    if capture_rows == "last":
        ids = torch.cat([ids, ids[:, -1:]], dim=1)
        am = torch.cat([am, torch.zeros_like(am[:, -1:])], dim=1)
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=inp["input_ids"][:, :cut], attention_mask=inp["attention_mask"][:, :cut],
              pixel_values=inp["pixel_values"], past_key_values=cache, use_cache=True)
        with patch_model(model, capture="all", capture_rows=capture_rows, backend="torch") as vg:
            with pytest.warns(UserWarning, match="inside the KV cache"):
                model.generate(input_ids=ids, attention_mask=am, past_key_values=cache, max_new_tokens=1,
                               do_sample=False)
    assert [s for s, _ in vg.skipped] == [0] and "inside the KV cache" in vg.skipped[0][1]
    assert bool(torch.isnan(vg.maps).all())


def test_two_handles_unpatched_in_creation_order():
    """Handles on disjoint layers, unpatched first-in-first-out: the one left keeps its
    generate hook (one map row per input sample under beams) and the model is restored."""
    name = "tiny-llava"
    model, proc, _ = models(name, num_layers=2)
    inp = make_inputs(name, proc, PROMPTS[:2], SIZES[:2])
    base = logits_of(model, inp)
    assert "generate" not in model.__dict__
    a = patch_model(model, capture=[0], backend="torch")
    b = patch_model(model, capture=[1], backend="torch")
    a.unpatch()
    with torch.no_grad():
        model.generate(**inp, max_new_tokens=2, do_sample=False, num_beams=2)
    assert tuple(b.maps.shape[:2]) == (2, 1) and not bool(torch.isnan(b.maps).all())
    assert a.maps is None or bool(torch.isnan(a.maps).all()) or a.maps.shape[0] == 2
    b.unpatch()
    assert "generate" not in model.__dict__
    assert torch.equal(logits_of(model, inp), base)
    # last-in-first-out, as before
    a = patch_model(model, capture=[0], backend="torch")
    b = patch_model(model, capture=[1], backend="torch")
    b.unpatch()
    a.unpatch()
    assert "generate" not in model.__dict__
