"""Bad input to patch_model gets a ValueError (or TypeError) saying what was found."""
from __future__ import annotations

import pytest
import torch

from vgkernels import KnockoutPlan, patch_model

from tiny_models import PROMPTS, SIZES, expected_spans, logits_of, make_inputs, models


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-splice"])
def test_no_image_tokens(name):
    """Capture passes through (maps NaN, the reason in vg.skipped); a knockout raises."""
    model, proc, _ = models(name)
    if name == "tiny-splice":
        inp = proc(text=["USER: no image here ASSISTANT:"])
        inp["images"] = None
        msg = "no image sentinel"
    else:
        inp = make_inputs(name, proc, ["Hello there"], [], with_image=False)
        msg = "no image tokens"
    base = logits_of(model, inp)
    with patch_model(model, capture="all", backend="torch") as vg:
        with pytest.warns(UserWarning, match=msg):
            got = logits_of(model, inp)
    assert torch.equal(got, base)
    assert len(vg.skipped) == 1 and vg.skipped[0][0] in (0, None) and msg in vg.skipped[0][1]
    assert vg.maps is not None and bool(torch.isnan(vg.maps).all())
    with patch_model(model, capture=None, knockout=KnockoutPlan([1], torch.ones(1, 4, dtype=torch.bool)),
                     backend="torch"):
        with pytest.raises(ValueError, match=msg):
            logits_of(model, inp)
    # the failed forward left nothing behind
    assert all("_vg_takeover" not in l.self_attn.__dict__ for l in model.modules() if hasattr(l, "self_attn"))


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl", "tiny-splice-vila"])
def test_keep_of_wrong_length(name):
    model, proc, _ = models(name)
    inp = make_inputs(name, proc, PROMPTS[:1], SIZES[:1])
    n = expected_spans(name, model, inp)[0][0][1]
    plan = KnockoutPlan([1], torch.ones(1, n + 1, dtype=torch.bool))
    with patch_model(model, capture=None, knockout=plan, backend="torch"):
        with pytest.raises(ValueError, match=rf"knockout.keep: expected shape \(1, {n}\).*got \(1, {n + 1}\)"):
            logits_of(model, inp)
    plan = KnockoutPlan([1], torch.ones(2, n, dtype=torch.bool))
    with patch_model(model, capture=None, knockout=plan, backend="torch"):
        with pytest.raises(ValueError, match=r"knockout.keep: expected shape \(1, "):
            logits_of(model, inp)


def test_layer_out_of_range():
    model, _, _ = models("tiny-llava")
    with pytest.raises(ValueError, match=r"capture: layer\(s\) \[4\] out of range.*4 decoder layers \(0..3\)"):
        patch_model(model, capture=[0, 4])
    with pytest.raises(ValueError, match=r"knockout.layers: layer\(s\) \[-1\] out of range"):
        patch_model(model, capture=None, knockout=KnockoutPlan([-1], torch.ones(1, 16, dtype=torch.bool)))
    # nothing was patched by the failed calls
    assert all(l.self_attn.config._attn_implementation == "sdpa" for l in model.model.language_model.layers)


def test_unsupported_model():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    lm = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"unsupported model LlamaForCausalLM \(model_type='llama'\).*llava.*qwen.*splice"):
        patch_model(lm)
    with pytest.raises(ValueError, match=r"family: expected one of"):
        patch_model(lm, family="gemma")
    with pytest.raises(ValueError, match="unsupported model Linear"):
        patch_model(torch.nn.Linear(2, 2))


def test_bad_plan_arguments():
    keep = torch.ones(1, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="knockout.mode"):
        KnockoutPlan([1], keep, mode="drop")
    with pytest.raises(ValueError, match="knockout.queries"):
        KnockoutPlan([1], keep, queries="all")
    with pytest.raises(TypeError, match="knockout.keep: expected dtype torch.bool"):
        KnockoutPlan([1], keep.float())
    with pytest.raises(ValueError, match=r"knockout.keep: expected a \(B, N\) bool tensor, got \(16,\)"):
        KnockoutPlan([1], keep[0])
    model, _, _ = models("tiny-llava")
    with pytest.raises(ValueError, match="capture: expected 'all'"):
        patch_model(model, capture="some")
    with pytest.raises(ValueError, match="backend: expected one of"):
        patch_model(model, backend="cudnn")


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-splice"])
def test_two_images_in_one_sample(name):
    model, proc, _ = models(name)
    from vgkernels.integrations.tiny import test_image

    imgs = [test_image(80, 60), test_image(60, 80, seed=1)]
    if name == "tiny-splice":
        inp = proc(images=imgs, text=["USER: <image>\n<image>\nSame? ASSISTANT:"])
    else:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True)
        inp = proc(images=imgs, text=[text], return_tensors="pt")
    base = logits_of(model, inp)
    with patch_model(model, capture="all", backend="torch") as vg:
        with pytest.warns(UserWarning, match="2 images"):
            got = logits_of(model, inp)
    assert torch.equal(got, base)
    assert vg.skipped and vg.skipped[0][0] == 0 and "2 images" in vg.skipped[0][1]
    assert vg.layout == [None] and bool(torch.isnan(vg.maps).all())
    with patch_model(model, capture=None, knockout=KnockoutPlan([1], torch.ones(1, 16, dtype=torch.bool)),
                     backend="torch"):
        with pytest.raises(ValueError, match="sample 0: 2 images"):
            logits_of(model, inp)


def test_explicit_family_overrides_detection():
    model, proc, _ = models("tiny-llava")
    inp = make_inputs("tiny-llava", proc, PROMPTS[:1], SIZES[:1])
    with patch_model(model, family="qwen", backend="torch") as vg:
        # qwen looks for <|image_pad|> via config.image_token_id, which tiny-llava maps to <image>,
        # but it needs image_grid_thw: the qwen shim says so, and capture passes through.
        with pytest.warns(UserWarning, match="image_grid_thw"):
            logits_of(model, inp)
    assert vg.family == "qwen" and "image_grid_thw" in vg.skipped[0][1]
    with patch_model(model, family="llava", capture=[0], backend="torch") as vg:
        logits_of(model, inp)
    assert vg.family == "llava" and vg.maps.shape[:2] == (1, 1) and not vg.skipped


def test_static_cache_and_double_patch():
    """A static cache: capture passes through (generate gives the unpatched tokens), a
    knockout is refused; patching a patched layer twice is refused."""
    model, proc, _ = models("tiny-llava")
    inp = make_inputs("tiny-llava", proc, PROMPTS[:1], SIZES[:1])
    kw = dict(max_new_tokens=2, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        want = model.generate(**inp, **kw)
    with patch_model(model, capture=[0], backend="torch") as vg:
        with pytest.raises(ValueError, match="layer\\(s\\) \\[0\\] are already patched"):
            patch_model(model, capture=[0, 1])
        with pytest.warns(UserWarning, match="dynamic KV cache"):
            with torch.no_grad():
                got = model.generate(**inp, **kw)
    assert torch.equal(got, want)
    assert "dynamic KV cache" in vg.skipped[0][1] and bool(torch.isnan(vg.maps).all())
    keep = torch.ones(1, expected_spans("tiny-llava", model, inp)[0][0][1], dtype=torch.bool)
    with patch_model(model, capture=None, knockout=KnockoutPlan([1], keep), backend="torch"):
        with pytest.raises(ValueError, match="dynamic KV cache"):
            model.generate(**inp, **kw)
    # the outer handles restored everything
    assert all(l.self_attn.config._attn_implementation == "sdpa" for l in model.model.language_model.layers)
