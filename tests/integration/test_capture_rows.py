"""``capture_rows="question"``: per head, the probabilities over the image averaged over
the question rows (the first text token after the image through the last prompt token),
against the eager twin's ``output_attentions`` averaged the same way, with and without a
knockout, composed and fused, padded batches."""
from __future__ import annotations

import pytest
import torch

from vgkernels import KnockoutPlan, patch_model

from tiny_models import (ALL_NAMES, MAP_TOL, PROMPTS, SIZES, column_to_row, expected_spans, is_splice,
                      knockout_reference, make_inputs, models)


def eager_question_maps(name, ref, inputs, spans, mask):
    """``(B, L, H, N_max)``: eager probabilities over each sample's image, averaged over its
    rows ``[key_start + N, last]``, NaN-padded, row-major."""
    with torch.no_grad():
        att = ref(**inputs, output_attentions=True).attentions
    B, L, H = len(spans), len(att), att[0].shape[1]
    out = torch.full((B, L, H, max(n for _, n in spans)), float("nan"))
    for b, (ks, n) in enumerate(spans):
        last = int(torch.nonzero(mask[b]).max())
        for l in range(L):
            m = att[l][b, :, ks + n: last + 1, ks: ks + n].double().mean(dim=1).float()
            out[b, l, :, :n] = m[:, column_to_row(n)] if name == "tiny-splice-vila" else m
    return out


@pytest.mark.parametrize("execution", ["composed", "fused"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_question_rows_match_eager_means(name, execution, gen):
    model, proc, ref = models(name)
    side = "right" if not is_splice(name) else "left"
    inp = make_inputs(name, proc, PROMPTS[1:3], SIZES[1:3], padding_side=side)
    spans, mask = expected_spans(name, model, inp)
    with patch_model(model, capture="all", capture_rows="question", backend="torch", execution=execution) as vg:
        with torch.no_grad():
            model(**inp)
    want = eager_question_maps(name, ref, inp, spans, mask)
    torch.testing.assert_close(vg.maps, want, **MAP_TOL)
    # a mean of softmax rows: mass over the image in (0, 1]
    assert bool((vg.maps.nansum(-1) > 0).all()) and bool((vg.maps.nansum(-1) <= 1 + 1e-5).all())
    keep = torch.rand(2, max(n for _, n in spans), generator=gen) > 0.5
    for mode in ("renorm", "zero"):
        plan = KnockoutPlan([1, 2], keep, mode=mode)
        with patch_model(model, capture="all", capture_rows="question", knockout=plan, backend="torch",
                         execution=execution) as vg, torch.no_grad():
            model(**inp)
        with knockout_reference(name, ref, inp, [1, 2], keep, mode=mode):
            want = eager_question_maps(name, ref, inp, spans, mask)
        torch.testing.assert_close(vg.maps, want, **MAP_TOL)
        for b, (_, n) in enumerate(spans):
            assert bool((vg.maps[b, 1:3, :, :n][..., ~keep[b, :n]] == 0).all())


def test_no_question_rows_is_skipped():
    """A prompt that ends with the image has no question rows: NaN and the reason."""
    model, proc, _ = models("tiny-llava")
    from vgkernels.integrations.tiny import test_image

    inp = proc(images=[test_image(*SIZES[0])], text=["<image>"], return_tensors="pt")
    with patch_model(model, capture="all", capture_rows="question", backend="torch") as vg:
        with pytest.warns(UserWarning, match="no question rows"), torch.no_grad():
            model(**inp)
    assert vg.skipped == [(0, "no question rows after the image")] and bool(torch.isnan(vg.maps).all())
    with pytest.raises(ValueError, match="capture_rows"):
        patch_model(model, capture_rows="all")
