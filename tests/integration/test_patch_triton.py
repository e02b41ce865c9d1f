"""patch_model through the Triton kernels (the GPU path; on CPU, Triton's interpreter).

Kept to one small model and prompt: the interpreter is slow. The other integration tests
use backend="torch"; this one checks that the patched layers drive the Triton backend
with the same results.
"""
from __future__ import annotations

import torch

from vgkernels import KnockoutPlan, patch_model

from tiny_models import MAP_TOL, PROMPTS, SIZES, TOL, eager_rows, expected_spans, knockout_reference, logits_of, make_inputs, models


def test_triton_backend_capture_and_knockout(gen):
    name = "tiny-llava"
    model, proc, ref = models(name)
    inp = make_inputs(name, proc, PROMPTS[:2], SIZES[:2])
    spans, mask = expected_spans(name, model, inp)
    keep = torch.rand(2, spans[0][1], generator=gen) > 0.5
    plan = KnockoutPlan([1], keep, mode="renorm")
    with patch_model(model, capture="all", knockout=plan, backend="triton") as vg:
        got = logits_of(model, inp)
        maps = vg.maps.clone()
    with knockout_reference(name, ref, inp, [1], keep):
        rows, want = eager_rows(name, ref, inp, spans, mask)
    for b in range(2):
        torch.testing.assert_close(got[b][mask[b]], want[b][mask[b]], **TOL)
    torch.testing.assert_close(maps, rows, **MAP_TOL)
