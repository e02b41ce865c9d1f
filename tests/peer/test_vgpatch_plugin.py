"""The vgpatch pytest plugin, run in a pytest subprocess on tests that build tiny models."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import compare  # noqa: E402

pytest_plugins = ["pytester"]

INNER = '''
import copy, gc, weakref
import torch
import transformers
from vgkernels.integrations.tiny import build_tiny, test_image as draw_image

_REF = []


def _inputs(proc):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    return proc(images=[draw_image(64, 48)], text=[text], return_tensors="pt")


def test_a_forward():
    model, proc = build_tiny("tiny-llava")
    with torch.no_grad():
        out = model(**_inputs(proc))
    assert torch.isfinite(out.logits).all()
    _REF.append(weakref.ref(model))


def test_b_models_do_not_outlive_their_test():
    gc.collect()
    assert _REF and _REF[0]() is None


def test_c_deepcopy_is_patched_on_its_own():
    model, proc = build_tiny("tiny-llava")
    twin = copy.deepcopy(model)
    inputs = _inputs(proc)
    with torch.no_grad():
        a = twin(**inputs).logits
        b = model(**inputs).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_d_second_post_init_builds_nothing():
    model, proc = build_tiny("tiny-llava")
    model.post_init()


def test_e_text_model_is_left_alone():
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
'''


@pytest.fixture
def run(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    def go(source):
        pytester.makepyfile(test_inner=source)
        res = pytester.runpytest_subprocess("-p", "vgpatch_plugin", "--vgpatch-json=counts.json",
                                            "--junitxml=junit.xml", "-p", "no:cacheprovider")
        counts = json.loads((pytester.path / "counts.json").read_text())
        return res, counts, compare.load_junit(str(pytester.path / "junit.xml"))

    return go


def test_plugin_patches_counts_and_releases(run):
    res, counts, junit = run(INNER)
    res.assert_outcomes(passed=5)
    assert res.ret == 0
    per = {tid.rsplit("::", 1)[-1]: r.props for tid, r in junit.items()}
    # One LlavaForConditionalGeneration per test; its vision tower, Llama and LlavaModel are parts.
    assert per["test_a_forward"]["vgpatch_patched"] == "1"
    assert int(per["test_a_forward"]["vgpatch_calls"]) > 0
    assert int(per["test_a_forward"]["vgpatch_captures"]) > 0
    assert per["test_c_deepcopy_is_patched_on_its_own"]["vgpatch_patched"] == "2"
    assert int(per["test_c_deepcopy_is_patched_on_its_own"]["vgpatch_captures"]) >= 2
    assert per["test_d_second_post_init_builds_nothing"]["vgpatch_patched"] == "1"
    assert per["test_d_second_post_init_builds_nothing"]["vgpatch_refused"] == "0"
    assert per["test_e_text_model_is_left_alone"]["vgpatch_patched"] == "0"
    assert per["test_e_text_model_is_left_alone"]["vgpatch_refused"] == "1"
    assert per["test_e_text_model_is_left_alone"]["vgpatch_calls"] == "0"
    assert counts["patched"] == 4 and counts["refused"] == 1 and counts["errors"] == 0
    assert counts["refused_classes"] == {"LlamaForCausalLM": 1}
    assert counts["captures"] > 0 and counts["failed_because"] == []
    res.stdout.fnmatch_lines(["*instances patched: 4 (in 3 tests)*", "*LlamaForCausalLM x1*"])


def test_plugin_fails_a_session_where_nothing_was_patched(run):
    res, counts, _ = run("def test_nothing():\n    assert 1 + 1 == 2\n")
    res.assert_outcomes(passed=1)
    assert res.ret == 1
    assert counts["patched"] == 0 and "no model instance was patched" in counts["failed_because"]
    res.stdout.fnmatch_lines(["*vgpatch: FAILING the session: no model instance was patched*"])
