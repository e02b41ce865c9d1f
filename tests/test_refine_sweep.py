"""VGRefine sweeps reuse one capture; last-row and question-row maps equal full patched runs; bad input raises."""
import pytest
import torch

from vgkernels.refine import Setting, VGRefine
from tiny_models import models
from vgkernels.integrations.tiny import test_image as make_image

HEADS = [(2, 1), (1, 0), (3, 3), (1, 2), (2, 0), (0, 1)]
def model(name):
    """The shared tiny model and its processor (tests/tiny_models.py)."""
    return models(name)[:2]


def batch(gen, n=2):
    seeds = torch.randint(0, 10_000, (n,), generator=gen).tolist()
    sizes = [(64, 48), (40, 84), (56, 56)][:n]
    qs = ["Is there a cat?", "Which side is the lesion on, left or right?", "Is it round?"][:n]
    return [make_image(w, h, seed=s) for (w, h), s in zip(sizes, seeds)], qs


class LayerCounter:
    """Rows each decoder layer computed (its MLP's input), call by call, and vision-tower calls."""

    def __init__(self, layers, vision=None):
        self.rows = {i: [] for i in range(len(layers))}
        self.vision = 0
        self.handles = [l.mlp.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, l in enumerate(layers)]
        if vision is not None:
            self.handles.append(vision.register_forward_pre_hook(self._vision))

    def _hook(self, i):
        def hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.rows[i].append(int(h.shape[1]))
        return hook

    def _vision(self, mod, args):
        self.vision += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def vision_module(m):
    for name in ("vision_tower", "visual"):
        v = getattr(m, name, None) or getattr(getattr(m, "model", None), name, None)
        if v is not None:
            return v
    raise AssertionError("no vision module")


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_sweep_pays_prefill_once_and_only_suffixes_per_setting(name, gen):
    m, proc = model(name)
    vr = VGRefine(m, proc, heads=HEADS, layers=[2], max_new_tokens=3)
    images, qs = batch(gen)
    grid = VGRefine.grid(k=[1, 2, 5], p=[30, 50, 90], layers=[(2,), (1, 3)])
    counter = LayerCounter(vr.stack.layers, vision_module(m))
    try:
        results = vr.sweep(images, qs, grid)
    finally:
        counter.remove()
    prep = vr.prepare(images, qs, grid)
    T, s_min = prep.T, min(prep.text_start)
    suffix = T - s_min
    R = len(vr._suffix_ids(vr.reference_prompt))
    assert counter.vision == 1, "the image must be encoded once for the whole grid"
    for layer, calls in counter.rows.items():
        # the prompt runs once, the reference text alone once, then only suffixes and decode steps
        assert calls[:2] == [T, R] and calls.count(T) == 1, (layer, calls)
        assert all(r <= suffix for r in calls[2:]), calls
    # the layers below a setting's first knockout layer never see its suffix pass
    # settings with the same keep mask and layers share one suffix pass
    distinct = {(torch.cat(r.keep).numpy().tobytes(), r.setting.layers) for r in results}
    n_first_1 = sum(1 for _, ls in distinct if min(ls) == 1)
    n_first_2 = sum(1 for _, ls in distinct if min(ls) == 2)
    assert counter.rows[0].count(suffix) == 0
    assert counter.rows[1].count(suffix) == n_first_1
    assert counter.rows[2].count(suffix) == n_first_1 + n_first_2
    # every setting's answer equals a run of that setting alone
    for st, r in zip(grid[::5], results[::5]):
        alone = vr.sweep(images, qs, [st])[0]
        assert torch.equal(alone.tokens, r.tokens), st.label()
        torch.testing.assert_close(alone.logits, r.logits, atol=1e-5, rtol=1e-5)
        for a, b in zip(alone.keep, r.keep):
            assert torch.equal(a, b)


def test_sweep_settings_differ_and_are_labelled(gen):
    m, proc = model("tiny-llava")
    vr = VGRefine(m, proc, heads=HEADS, layers=[2], max_new_tokens=2)
    images, qs = batch(gen)
    res = vr.sweep(images, qs, VGRefine.grid(k=[1, 6], p=[10, 90], layers=[(2,)]))
    kept = [int(sum(k.sum() for k in r.keep)) for r in res]
    n = sum(int(k.numel()) for k in res[0].keep)
    # p = 10 keeps about 90% of the tokens, p = 90 about 10%
    assert kept[0] > 0.75 * n and kept[1] < 0.25 * n and kept[2] > 0.75 * n and kept[3] < 0.25 * n
    assert [r.setting.label() for r in res] == ["K=1 p=10 layers=2", "K=1 p=90 layers=2",
                                                "K=6 p=10 layers=2", "K=6 p=90 layers=2"]
    assert len({r.setting for r in res}) == 4


@pytest.mark.parametrize("maps", ["last", "question"])
@pytest.mark.parametrize("name", ["tiny-llava-next", "tiny-qwen2.5-vl", "tiny-splice-vila"])
def test_maps_equal_full_patched_runs(name, maps, gen):
    """VGRefine's question maps (pass I) and reference maps (a suffix on pass I's cache)
    equal patch_model on the full question and reference prompts, one sample at a time."""
    from vgkernels import patch_model
    from vgkernels.integrations import get_shim

    m, proc = model(name)
    images, qs = batch(gen, 2)
    vr = VGRefine(m, proc, heads=HEADS, layers=[2], max_new_tokens=2, maps=maps)
    r = vr(images, qs, return_maps=True)
    shim = get_shim(m, processor=proc)
    for b in range(2):
        for text, want in ((qs[b], r.maps[b]), (vr.reference_prompt, r.reference[b])):
            inp = shim.process(proc, [images[b]], [vr.prompt(text)])
            with patch_model(m, capture=r.map_layers, capture_rows=maps, backend="torch") as vg, torch.no_grad():
                m(**inp)
            got = vg.maps[0] if want.dim() == 3 else vg.maps[0].mean(dim=1)
            n = got.shape[-1]
            torch.testing.assert_close(want[..., :n], got, atol=1e-5, rtol=1e-4)


def test_bad_arguments_raise():
    m, proc = model("tiny-llava")
    with pytest.raises(ValueError, match="heads"):
        VGRefine(m, proc, heads=[(9, 0)], layers=[1])
    with pytest.raises(ValueError, match="heads"):
        VGRefine(m, proc, heads=[(0, 4)], layers=[1])
    with pytest.raises(ValueError, match="layers"):
        VGRefine(m, proc, heads=HEADS, layers=[4])
    with pytest.raises(ValueError, match="k: expected"):
        VGRefine(m, proc, heads=HEADS, layers=[1], top_k=7)
    with pytest.raises(ValueError, match="percentile"):
        VGRefine(m, proc, heads=HEADS, layers=[1], percentile=101)
    with pytest.raises(ValueError, match="mode"):
        VGRefine(m, proc, heads=HEADS, layers=[1], mode="drop")
    with pytest.raises(ValueError, match="maps: expected one of"):
        VGRefine(m, proc, heads=HEADS, layers=[1], maps="all")
    vr = VGRefine(m, proc, heads=HEADS, layers=[1])
    with pytest.raises(ValueError, match="as many images as questions"):
        vr([make_image(30, 30)], ["a?", "b?"])
    with pytest.raises(ValueError, match="settings"):
        vr.sweep([make_image(30, 30)], ["a?"], [])
    with pytest.raises(ValueError, match="layers"):
        vr.sweep([make_image(30, 30)], ["a?"], [Setting(None, 50.0, (7,))])


def test_without_reference_and_with_own_prompt(gen):
    """reference_prompt=None triages the question maps alone; prompt= replaces the template."""
    from vgkernels import triage_mask

    m, proc = model("tiny-qwen2-vl")
    images, qs = batch(gen)
    seen = []

    def prompt(text):
        seen.append(text)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q: " + text}]}]
        return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    vr = VGRefine(m, proc, heads=HEADS, layers=[2], percentile=40, reference_prompt=None, prompt=prompt,
                  max_new_tokens=2)
    r = vr(images, qs, return_maps=True)
    assert r.reference is None and seen[:len(qs)] == qs
    local = [(r.map_layers.index(l), h) for l, h in HEADS]
    keep = triage_mask(r.maps, local, percentile=40)
    for b, k in enumerate(r.keep):
        assert torch.equal(k, keep[b, : k.numel()])
