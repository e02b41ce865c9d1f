"""VGRefine's decoding settings: sampling as ``model.generate`` samples, knockout on the
prompt rows only.

References are transformers' own ``generate`` with the same settings after
``torch.manual_seed(seed)``: for the baseline on the plain model, for VGRefine under
``patch_model`` with the keep mask VGRefine chose (``queries="prompt"``: decode steps
are not knocked out).
"""
import pytest
import torch

from vgkernels import KnockoutPlan, patch_model
from vgkernels.integrations.continuation import Sampling
from vgkernels.refine import VGRefine
from tiny_models import models
from vgkernels.integrations.tiny import test_image as make_image

HEADS = [(2, 1), (1, 0), (3, 3), (1, 2)]
G = 5
def model(name):
    """The shared tiny model and its processor (tests/tiny_models.py)."""
    return models(name)[:2]


def inputs(proc, images, questions):
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True, tokenize=False) for q in questions]
    if hasattr(proc, "tokenizer_image_token"):  # the LLaVA codebase pads after its splice
        return dict(proc(images=images, text=texts, padding_side="right"))
    return dict(proc(images=images, text=texts, return_tensors="pt", padding=True))


def generated(model, inp, out):
    # HF VLMs return prompt + new ids; the LLaVA codebase (generating from embeddings) the new ids only
    return out[:, inp["input_ids"].shape[1]:] if not hasattr(model, "get_vision_tower") else out


SETTINGS = dict(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.3)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-splice"])
def test_sampled_baseline_and_knockout_equal_generate(name):
    m, proc = model(name)
    images = [make_image(64, 48, seed=1), make_image(48, 64, seed=2)]
    # prompts of one length: transformers 4.57 counts left padding in the repetition
    # penalty, 5.x does not (VGRefine follows 5.x); without padding both agree
    questions = ["Is there a cat?", "Is there a dog?"]
    vr = VGRefine(m, proc, heads=HEADS, layers=[2], max_new_tokens=G, seed=123, sample_top_k=7, **SETTINGS)
    res = vr(images, questions, baseline=True)
    inp = inputs(proc, images, questions)
    eos = vr.eos or None
    kw = dict(max_new_tokens=G, eos_token_id=eos, pad_token_id=vr.pad_id, top_k=7, **SETTINGS)
    with torch.no_grad():
        torch.manual_seed(123)
        base = generated(m, inp, m.generate(**inp, **kw))
        keep = torch.nn.utils.rnn.pad_sequence(res.keep, batch_first=True)
        with patch_model(m, capture=None, knockout=KnockoutPlan([2], keep), backend="torch"):
            torch.manual_seed(123)
            knocked = generated(m, inp, m.generate(**inp, **kw))
    assert torch.equal(res.baseline_tokens[:, : base.shape[1]], base)
    assert torch.equal(res.tokens[:, : knocked.shape[1]], knocked)
    assert not torch.equal(res.tokens, res.baseline_tokens) or not torch.equal(res.logits, res.baseline_logits)


def test_seed_repeats_and_greedy_is_the_default():
    m, proc = model("tiny-llava")
    images, qs = [make_image(56, 56, seed=3)] * 2, ["What is shown?", "Is it round?"]
    runs = [VGRefine(m, proc, heads=HEADS, layers=[2], max_new_tokens=G, do_sample=True, temperature=2.0,
                     seed=s)(images, qs) for s in (5, 5, 6)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert not torch.equal(runs[0].tokens, runs[2].tokens)  # temperature 2 on random weights: draws differ
    greedy = VGRefine(m, proc, heads=HEADS, layers=[2], max_new_tokens=G)(images, qs)
    first = greedy.step_logits[0].argmax(-1)
    assert torch.equal(greedy.tokens[:, 0], first)


def test_sampling_rules_match_generate_processors():
    """One step of Sampling against transformers' own logits processors."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    history = torch.randint(0, 50, (3, 7), generator=g)
    s = Sampling(do_sample=True, temperature=0.5, top_k=10, top_p=0.8, repetition_penalty=1.4, seed=9)
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.4), TemperatureLogitsWarper(0.5),
                                 TopKLogitsWarper(10), TopPLogitsWarper(0.8)])
    want = procs(history, logits.clone())
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, history, True)
    draws = torch.stack([s.choose(logits, seen, torch.Generator().manual_seed(k)) for k in range(200)])
    allowed = torch.isfinite(want)
    assert bool(allowed.gather(1, draws.T).all()), "a token the processors remove was drawn"
    torch.manual_seed(9)
    ref = torch.multinomial(want.softmax(-1), 1)[:, 0]
    assert torch.equal(s.choose(logits, seen, s.generator("cpu")), ref)


@pytest.mark.parametrize("kw, msg", [({"temperature": 0.0}, "temperature"), ({"top_p": 1.5}, "top_p"),
                                     ({"repetition_penalty": 0}, "repetition_penalty"), ({"sample_top_k": -1}, "top_k")])
def test_bad_sampling_settings(kw, msg):
    m, proc = model("tiny-llava")
    with pytest.raises(ValueError, match=msg):
        VGRefine(m, proc, heads=HEADS, layers=[2], do_sample=True, **kw)


def test_numpy_and_tensor_images_give_what_pil_images_give():
    """Processors take PIL images, numpy arrays (H, W, C) and tensors (C, H, W) alike; so
    does VGRefine (an array's ``.size`` is its element count, not a PIL size)."""
    import numpy as np

    from vgkernels.refine.method import _original_size

    m, proc = model("tiny-llava")
    pil = [make_image(56, 40, seed=3), make_image(40, 56, seed=4)]
    arrays = [np.array(im) for im in pil]  # writable copies
    tensors = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
    assert [_original_size(x) for x in pil] == [_original_size(x) for x in arrays] == \
        [_original_size(x) for x in tensors] == [(56, 40), (40, 56)]
    qs = ["What is shown?", "Is it round?"]
    vr = VGRefine(m, proc, heads=HEADS, layers=[2], max_new_tokens=G)
    want = vr(pil, qs)
    for images in (arrays, tensors):
        got = vr(images, qs)
        assert all(torch.equal(a, b) for a, b in zip(got.keep, want.keep)) and len(got.keep) == 2
        assert torch.equal(got.tokens, want.tokens) and got.answers == want.answers
