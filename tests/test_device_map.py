"""Models larger than one GPU: --device-map auto / --gpus-per-instance K (the GPU
arithmetic with mocked device counts), loading that never turns into tensor
parallelism under torchrun, and the device_map path on the CPU: a checkpoint split
between the CPU and the disk by max_memory, swept and patched like a plain model."""
import argparse
import os

import numpy as np
import pytest
import torch

import vgkernels
from vgkernels.integrations import loaders
from vgkernels.integrations.loaders import load_model
from vgkernels.sweep import dist
from vgkernels.sweep.command import sweep
from vgkernels.sweep.datasets import Sample
from vgkernels.sweep.store import load_results
from vgkernels.integrations.tiny import build_tiny
from vgkernels.integrations.tiny import test_image as make_image

from sweep_fake import one_thread


_one_thread = pytest.fixture(autouse=True)(one_thread)


# ----------------------------------------------------------------------------- GPU arithmetic


def _usage_error():
    from vgkernels.clitools import UsageError

    return UsageError


def model_devices(model):
    return loaders.model_devices(model)


def test_instance_gpus_are_disjoint_blocks():
    UsageError = _usage_error()
    # 8 GPUs, torchrun --nproc-per-node 4, 2 GPUs per model
    assert [dist.instance_gpus(r, 4, 2, 8) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # one process with --device-map auto: every visible GPU
    assert dist.instance_gpus(0, 1, None, 4) == [0, 1, 2, 3]
    # no K given under torchrun: an equal share
    assert [dist.instance_gpus(r, 2, None, 5) for r in range(2)] == [[0, 1], [2, 3]]
    assert dist.instance_gpus(2, 3, 2, 6) == [4, 5]
    with pytest.raises(UsageError, match=r"needs 8 GPUs, but 6 are visible; start torchrun with --nproc-per-node 3"):
        dist.instance_gpus(0, 4, 2, 6)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        dist.instance_gpus(0, 1, None, 0)
    with pytest.raises(UsageError, match="not a valid rank"):
        dist.instance_gpus(4, 4, 1, 8)


@pytest.fixture
def eight_gpus(monkeypatch):
    free = {i: (10 + i) * 2 ** 30 for i in range(8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 80 * 2 ** 30))
    return free


def _args(**kw):
    base = {"device": None, "device_map": None, "gpus_per_instance": None}
    return argparse.Namespace(**{**base, **kw})


def test_placement_restricts_each_instance_to_its_gpus(eight_gpus, monkeypatch):
    UsageError = _usage_error()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    info = dist.DistInfo(rank=6, world=8, local_rank=2)  # second node, local rank 2
    place = dist.placement(info, _args(gpus_per_instance=2))
    assert place == {"device_map": "auto", "max_memory": {4: int(eight_gpus[4] * 0.9), 5: int(eight_gpus[5] * 0.9)}}
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    one = dist.placement(dist.DistInfo(), _args(device_map="auto"))
    assert sorted(one["max_memory"]) == list(range(8))
    assert dist.placement(dist.DistInfo(), _args()) == {"device": "cuda:0"}
    with pytest.raises(UsageError, match="exclusive"):
        dist.placement(dist.DistInfo(), _args(device_map="auto", device="cuda:1"))


def test_torchrun_rank_sets_the_first_gpu_of_its_instance(eight_gpus, monkeypatch):
    import torch.distributed as tdist

    UsageError = _usage_error()

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda *a, **k: calls.append(("init", a[0])))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("device", d)))
    info = dist.init(gpus_per_instance=2)
    assert (info.rank, info.local_rank) == (3, 3) and calls == [("init", "nccl"), ("device", 6)]
    calls.clear()
    with pytest.raises(UsageError, match="needs 12 GPUs"):
        dist.init(gpus_per_instance=3)
    assert calls == []


# ----------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    model, proc = build_tiny("tiny-llava", seed=4)
    model.save_pretrained(d)
    proc.save_pretrained(d)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return str(d), size


def test_torchrun_environment_is_hidden_while_loading(ckpt, monkeypatch):
    """transformers before huggingface/transformers#38942 turned device_map="auto" + WORLD_SIZE
    into tensor parallelism; whatever the version, from_pretrained never sees torchrun's variables."""
    import transformers

    path, _ = ckpt
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    cls = transformers.LlavaForConditionalGeneration
    orig = cls.from_pretrained.__func__
    seen = {}

    def spy(klass, name, **kw):
        seen["env"] = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        seen["kw"] = dict(kw)
        return orig(klass, name, **kw)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    b = load_model(path, device_map="auto", max_memory={"cpu": 2 ** 30})
    assert seen["env"] == {"WORLD_SIZE": None, "RANK": None, "LOCAL_RANK": None}
    assert seen["kw"]["device_map"] == "auto" and seen["kw"]["max_memory"] == {"cpu": 2 ** 30}
    assert not {"tp_plan", "tp_size", "distributed_config", "device_mesh"} & set(seen["kw"])
    assert os.environ["WORLD_SIZE"] == "2" and os.environ["LOCAL_RANK"] == "1"  # restored
    assert b.device == torch.device("cpu") and model_devices(b.model) == ["cpu"]


def test_a_tensor_parallel_model_is_refused():
    model, _ = build_tiny("tiny-llava")
    loaders.check_not_tensor_parallel(model)
    model._tp_size = 2
    with pytest.raises(RuntimeError, match="tensor parallelism"):
        loaders.check_not_tensor_parallel(model, "ckpt")


def _samples(tmp_path, n=3):
    out = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        make_image(56, 56, seed=i).save(p)
        out.append(Sample(i, f"s{i}", str(p), "Is there a shape?", [[5.0 + i, 6.0, 20.0, 20.0]]))
    return out


def _maps(bundle, sample):
    from vgkernels.sweep.runner import Encoder

    e = Encoder(bundle)(sample)
    inputs = {k: v[None].to(bundle.device) for k, v in e.q.items()}
    inputs.update({k: v.to(bundle.device) for k, v in e.pixels.items()})
    with torch.no_grad(), vgkernels.patch_model(bundle.model, capture="all", processor=bundle.processor,
                                                image_sizes=[e.image_size]) as vg:
        logits = bundle.model(**inputs).logits[:, -1]
    return vg.maps, logits


def test_a_model_split_by_device_map_sweeps_and_patches_like_a_whole_one(ckpt, tmp_path):
    path, size = ckpt
    # max_memory leaves room on the CPU for the first modules only: the rest goes to disk
    split = load_model(path, device_map="auto", max_memory={"cpu": int(size * 0.6)},
                       offload_folder=str(tmp_path / "offload"))
    whole = load_model(path)
    where = set(split.model.hf_device_map.values())
    assert where == {"cpu", "disk"}, split.model.hf_device_map
    assert split.placement() == "device_map over cpu, disk"
    samples = _samples(tmp_path)
    for b, out in ((split, "split"), (whole, "whole")):
        sweep(b, samples, str(tmp_path / out), batch_size=2, overlays=0, report=False, progress=False,
              log=lambda *a: None)
    _, recs_s, head_s, layer_s = load_results(str(tmp_path / "split"))
    _, recs_w, head_w, layer_w = load_results(str(tmp_path / "whole"))
    assert [r["sid"] for r in recs_s] == [r["sid"] for r in recs_w] == ["s0", "s1", "s2"]
    np.testing.assert_allclose(head_s, head_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer_s, layer_w, rtol=1e-5, atol=1e-6)
    ms, ls = _maps(split, samples[0])
    mw, lw = _maps(whole, samples[0])
    torch.testing.assert_close(ms, mw, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ls, lw, rtol=1e-5, atol=1e-6)
    # the tiny models take the same path through accelerate
    tiny = load_model("tiny-llava", seed=4, device_map="auto", max_memory={"cpu": int(size * 0.6)},
                      offload_folder=str(tmp_path / "offload2"))
    assert "disk" in model_devices(tiny.model)
    mt, lt = _maps(tiny, samples[0])
    torch.testing.assert_close(mt, mw, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_layers_on_two_gpus(ckpt, tmp_path):
    """Layers on two GPUs: the takeover views each call's plan on the layer's device and
    gathers the maps on the first."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs (this machine has fewer)")
    path, _ = ckpt
    whole = load_model(path, device="cuda:0", dtype="float32")
    names = list(whole.model.hf_device_map) if getattr(whole.model, "hf_device_map", None) else None
    assert names is None
    dm = {"model.vision_tower": 0, "model.multi_modal_projector": 0, "model.language_model.embed_tokens": 0,
          "model.language_model.layers.0": 0, "model.language_model.layers.1": 0,
          "model.language_model.layers.2": 1, "model.language_model.layers.3": 1,
          "model.language_model.norm": 1, "model.language_model.rotary_emb": 1, "lm_head": 1}
    split = load_model(path, device_map=dm, dtype="float32")
    assert model_devices(split.model) == ["cuda:0", "cuda:1"]
    s = _samples(tmp_path, 1)[0]
    ms, ls = _maps(split, s)
    mw, lw = _maps(whole, s)
    torch.testing.assert_close(ms.cpu(), mw.cpu(), rtol=1e-4, atol=1e-6)
