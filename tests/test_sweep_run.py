"""End-to-end sweeps on the tiny models (CPU): eager equality, prefix sharing, data,
rejects, resume after a kill, and torchrun/gloo with two processes."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vgkernels.layout import box_mask, grid_layout
from vgkernels.reference import grounding_metrics_ref
from vgkernels.sweep.command import sweep
from vgkernels.sweep.datasets import Sample, load_samples
from vgkernels.integrations.loaders import load_model
from vgkernels.sweep.runner import DEFAULT_ANSWER_SUFFIX, DEFAULT_REFERENCE, Encoder, MapRunner, with_suffix
from vgkernels.sweep.store import load_results, read_maps
from vgkernels.integrations.tiny import IMAGE_TOKEN_INDEX
from vgkernels.integrations.tiny import test_image as make_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project's shared/ folder sits beside the repository (CI clones main next to it).
OFFICIAL = os.environ.get("VGKERNELS_OFFICIAL_DATA") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "official")
FAMILIES = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-splice", "tiny-splice-vila"]
QUESTIONS = ["Is there a red square?", "Where is the bright rectangle in this image?", "Size?"]


def _images(tmp_path, sizes, seed=0):
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = tmp_path / f"img{i}.png"
        make_image(w, h, seed=seed + i).save(p)
        paths.append(str(p))
    return paths


def _samples(paths, boxes=None):
    out = []
    for i, p in enumerate(paths):
        b = boxes[i] if boxes else [[10.0 + 3 * i, 8.0, 30.0, 25.0]]
        out.append(Sample(i, f"s{i}", p, QUESTIONS[i % len(QUESTIONS)], b, fields={"modality": ["A", "B"][i % 2]}))
    return out


def _quiet(*a, **k):
    pass


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models are far too small for intra-op parallelism; on a busy 2-core
    runner, OpenMP threads waiting for each other make a 64-wide matmul 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- eager equality


def _eager_maps(eager, family, ids, extra, pixels):
    """Last-token attention over the image, every layer and head, from output_attentions.

    The span and the token order are found here from the ids, independently of the
    patch: HF families have one id per image token; splice models put N features at
    the -200 sentinel; VILA's projector emits them column-major.
    """
    with torch.no_grad():
        out = eager.model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                          **{k: v[None] for k, v in extra.items()}, **pixels, output_attentions=True)
    att = torch.stack([a[0, :, -1].float() for a in out.attentions])  # (L, H, S)
    if family.startswith("splice"):
        ks = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
        n = 16
        m = att[:, :, ks: ks + n]
        if family == "splice-vila":
            h = 4  # sequence token x*h + y holds grid cell (y, x)
            m = m.reshape(*m.shape[:2], h, h).transpose(-1, -2).reshape(*m.shape[:2], n)
        return m
    tok = eager.model.config.image_token_index if hasattr(eager.model.config, "image_token_index") \
        else eager.model.config.image_token_id
    pos = (ids == tok).nonzero()[:, 0]
    assert torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + len(pos)))
    return att[:, :, int(pos[0]): int(pos[0]) + len(pos)]


def _expected_metrics(mq, mr, mask):
    """Per head and per layer, raw and divided by the head-mean reference (float64)."""
    mask = mask.to(torch.float64)
    ref = mr.double().mean(1)
    h = grounding_metrics_ref(mq, mask)
    hr = grounding_metrics_ref(mq, mask, reference=ref[:, None, :])
    l_ = grounding_metrics_ref(mq.double().mean(1), mask)
    lr = grounding_metrics_ref(mq.double().mean(1), mask, reference=ref)
    head = torch.stack([h.ar, h.kl, h.js, hr.ar, hr.kl, hr.js]).numpy()
    layer = torch.stack([l_.ar, l_.kl, l_.js, lr.ar, lr.kl, lr.js]).numpy()
    return head, layer


@pytest.mark.parametrize("name", FAMILIES)
def test_sweep_matches_eager_output_attentions(tmp_path, name):
    bundle = load_model(name)
    family = name[len("tiny-"):]  # the variant: llava, llava-next, qwen2-vl, qwen2.5-vl, splice, splice-vila
    # Square images: the token grid then tiles the whole image, so the mask below is
    # computed without the patch's layout. Dynamic families also get a second size.
    side = {"llava": 56, "splice": 56, "splice-vila": 112}.get(family, 112)
    sizes = [(side, side)] * 3 if family in ("llava", "splice", "splice-vila") else [(112, 112), (84, 84), (112, 112)]
    paths = _images(tmp_path, sizes)
    samples = _samples(paths)
    out = tmp_path / "out"
    sweep(bundle, samples, str(out), batch_size=2, save_maps=True, overlays=0, report=False, progress=False,
          log=_quiet)
    meta, recs, head, layer = load_results(str(out))
    assert [r["sid"] for r in recs] == [s.sid for s in samples]
    eager = load_model(name, attn_implementation="eager")
    enc = Encoder(eager)
    for i, s in enumerate(samples):
        e = enc(s)
        assert e.error is None
        extra_q = {k: v for k, v in e.q.items() if k not in ("input_ids", "attention_mask")}
        extra_r = {k: v for k, v in e.r.items() if k not in ("input_ids", "attention_mask")}
        mq = _eager_maps(eager, family, e.q["input_ids"], extra_q, e.pixels)
        mr = _eager_maps(eager, family, e.r["input_ids"], extra_r, e.pixels)
        # raw maps (stored as scaled float16)
        sq, sr, cells = read_maps(str(out), recs[i], meta["L"], meta["H"])
        n = recs[i]["N"]
        if family == "llava-next":
            # base grid + tiles with newline tokens: the eager span holds all of them
            assert mq.shape[-1] == n and np.isnan(cells[:, 0]).sum() > 0
        else:
            assert mq.shape[-1] == n
        np.testing.assert_allclose(sq, mq.numpy(), rtol=2e-3, atol=1e-7)
        np.testing.assert_allclose(sr, mr.numpy(), rtol=2e-3, atol=1e-7)
        # metrics from the eager maps and an independently built mask
        if family == "llava-next":
            from vgkernels.layout import ImageLayout

            lay = ImageLayout(0, n, tuple(recs[i]["grid"]), torch.as_tensor(cells, dtype=torch.float64))
        else:
            g = int(math.isqrt(n))
            lay = grid_layout((g, g), sizes[i])
        mask = box_mask(lay, s.boxes)
        assert recs[i]["mask"] == "bbox" and recs[i]["mask_tokens"] == int(mask.sum()) > 0
        exp_head, exp_layer = _expected_metrics(mq, mr, mask)
        np.testing.assert_allclose(head[i], exp_head, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer[i], exp_layer, rtol=1e-4, atol=1e-5)


# The eager test above already holds every family's prefix-shared maps to full eager
# runs; here the families with ragged batches (image sizes, newline tokens, M-RoPE) and
# a reordered projector are held to patch_model's own full prefills.
@pytest.mark.parametrize("name", ["tiny-llava-next", "tiny-qwen2-vl", "tiny-splice-vila"])
def test_prefix_sharing_equals_full_separate_runs(tmp_path, name):
    """One prefix + two suffixes on its KV cache == two full prefills under patch_model."""
    bundle = load_model(name)
    sizes = [(112, 112), (96, 80), (70, 120), (112, 112)]
    items = [Encoder(bundle)(s) for s in _samples(_images(tmp_path, sizes, seed=5))]
    assert all(it.error is None for it in items)
    groups = {}
    for it in items:
        groups.setdefault(it.P, []).append(it)
    shared, full = MapRunner(bundle), MapRunner(bundle, prefix_sharing=False)
    for grp in groups.values():
        a, f = shared.run(grp), full.run(grp)
        assert [(l.key_start, l.N) for l in a.layouts] == [(l.key_start, l.N) for l in f.layouts]
        for x, y in ((a.maps_q, f.maps_q), (a.maps_ref, f.maps_ref)):
            assert torch.equal(x.isnan(), y.isnan())
            torch.testing.assert_close(x.nan_to_num(), y.nan_to_num(), rtol=1e-5, atol=1e-7)
        # the question and reference maps differ (the suffixes were not mixed up)
        assert (a.maps_q - a.maps_ref).nan_to_num().abs().max() > 1e-4


def test_reference_prompt_is_the_papers_with_the_answer_suffix():
    bundle = load_model("tiny-llava")
    enc = Encoder(bundle)
    assert enc.ref_text == bundle.chat("Write a general description of the image.\n"
                                       "Answer the question using a single word or phrase.")
    assert DEFAULT_REFERENCE == "Write a general description of the image."
    assert with_suffix("Q?", DEFAULT_ANSWER_SUFFIX).endswith("\nAnswer the question using a single word or phrase.")


def test_model_from_a_local_hugging_face_directory(tmp_path):
    from vgkernels.integrations.tiny import build_tiny

    model, proc = build_tiny("tiny-llava", seed=4)
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    b = load_model(str(tmp_path / "ckpt"))
    assert b.family == "llava" and type(b.model).__name__ == "LlavaForConditionalGeneration"
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in b.model.state_dict().items())
    assert b.chat("Q?") == "USER: <image>\nQ? ASSISTANT:"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "llava_qwen2"}))
    with pytest.raises(ValueError, match="LLaVA-codebase checkpoint"):
        load_model(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="neither a built-in tiny model"):
        load_model(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- data


def _stand_in_images(rows, root, ext=".jpg"):
    """An image per id, large enough for every box of that id."""
    need = {}
    for r in rows:
        w = max(x + bw for x, _, bw, _ in r["bbox"])
        h = max(y + bh for _, y, _, bh in r["bbox"])
        ow, oh = need.get(r["image"], (0, 0))
        need[r["image"]] = (max(ow, w), max(oh, h))
    for img, (w, h) in need.items():
        path = os.path.join(root, f"{img}{ext}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        make_image(max(32, math.ceil(w) + 3), max(32, math.ceil(h) + 3), seed=len(path)).convert("RGB").save(path)


def test_authors_files_end_to_end_with_stand_in_images(tmp_path):
    rows = []
    for name in sorted(os.listdir(OFFICIAL)):
        with open(os.path.join(OFFICIAL, name)) as f:
            rows += [json.loads(next(f)) for _ in range(2)]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _stand_in_images(rows, str(tmp_path / "images"))
    samples, rejects = load_samples(str(data), image_root=str(tmp_path / "images"), image_pattern="{image}.jpg")
    assert len(samples) == 8 and not rejects
    # a 24x24 grid (336 px, patch 14): the authors' gt_tokens are used as the mask
    bundle = load_model("tiny-llava:image_size=336")
    out = tmp_path / "out"
    sweep(bundle, samples, str(out), batch_size=4, overlays=0, report=False, progress=False, log=_quiet)
    meta, recs, head, layer = load_results(str(out))
    assert len(recs) == 8
    for r, row in zip(recs, rows):
        assert r["mask"] == "gt_tokens" and r["grid"] == [24, 24]
        assert r["mask_tokens"] == len({tuple(c) for c in row["gt_tokens"]})
        assert r["fields"]["label"] == row["label"]
        assert r["fields"].get("modality") == row.get("modality")
    assert np.isfinite(head).all() and np.isfinite(layer).all()
    # another grid: the boxes are used; a subset of layers keeps its decoder indices
    out2 = tmp_path / "out2"
    sweep(load_model("tiny-qwen2-vl"), samples[:3], str(out2), layers=[1, 3], batch_size=3, overlays=0,
          report=False, progress=False, log=_quiet)
    meta2, recs2, head2, _ = load_results(str(out2))
    assert [r["mask"] for r in recs2] == ["bbox"] * 3
    assert meta2["layers"] == [1, 3] and head2.shape == (3, 6, 2, 4)


def test_malformed_rows_and_bad_images_go_to_rejects(tmp_path):
    paths = _images(tmp_path, [(56, 56)] * 3)
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    good = lambda i, img: {"image": img, "question": f"Is there a shape {i}?", "bbox": [[5, 5, 20, 20]],
                           "label": "shape", "modality": "X"}
    lines = [json.dumps(good(0, "img0")), "{oops", json.dumps({"image": "img1", "question": "q?"}),
             json.dumps(good(1, "img1")), json.dumps(good(2, "missing")), json.dumps(good(3, "broken")),
             json.dumps(good(4, "img2"))]
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(lines) + "\n")
    samples, rejects = load_samples(str(data), fmt="official", image_root=str(tmp_path), image_pattern="{image}.png")
    out = tmp_path / "out"
    # workers=1: images are decoded in a DataLoader worker, whose failures must come back as rejects
    sweep(load_model("tiny-llava"), samples, str(out), parse_rejects=rejects, batch_size=2, overlays=0,
          workers=1, report=False, progress=False, log=_quiet)
    _, recs, head, _ = load_results(str(out))
    assert [r["fields"]["image_id"] for r in recs] == ["img0", "img1", "img2"]
    assert np.isfinite(head).all()
    rej = [json.loads(t) for t in open(out / "rejects.jsonl")]
    by_line = {r["line"]: r["error"] for r in rej}
    assert sorted(by_line) == [2, 3, 5, 6]
    assert "not valid JSON" in by_line[2] and "missing field 'bbox'" in by_line[3]
    assert "cannot read image" in by_line[5] and "missing.png" in by_line[5]
    assert "cannot read image" in by_line[6]


# ----------------------------------------------------------------------------- resume, torchrun


def _write_manifest(tmp_path, n, seed=0):
    paths = _images(tmp_path, [(56, 56)] * n, seed=seed)
    rows = [{"id": f"m{i}", "image": p, "boxes": [[4.0 + i, 6.0, 24.0, 20.0]], "question": QUESTIONS[i % 3],
             "modality": ["A", "B"][i % 2]} for i, p in enumerate(paths)]
    data = tmp_path / "manifest.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(data)


def _cli(*args):
    return [sys.executable, "-m", "vgkernels", "sweep", "--model", "tiny-llava", "--workers", "0",
            "--no-progress", "--no-report", "--overlays", "0", *args]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _index_lines(out):
    p = os.path.join(out, "shards", "index.r0.jsonl")
    if not os.path.exists(p):
        return 0
    with open(p, "rb") as f:
        return f.read().count(b"\n")


def test_killed_sweep_resumes_without_recomputing_or_duplicating(tmp_path):
    n = 10
    data = _write_manifest(tmp_path, n)
    out = str(tmp_path / "out")
    proc = subprocess.Popen(_cli("--data", data, "--out", out, "--batch-size", "2", "--throttle", "0.6"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(tmp_path))
    deadline = time.time() + 120
    while _index_lines(out) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be interrupted:\n" + proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    done_before = _index_lines(out)
    assert 4 <= done_before < n
    assert not os.path.exists(os.path.join(out, "samples.jsonl"))
    res = subprocess.run(_cli("--data", data, "--out", out, "--batch-size", "2"), env=_env(), cwd=str(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    log = res.stdout.decode()
    assert res.returncode == 0, log
    assert f"resuming: {done_before} samples already done" in log
    assert f"swept {n - done_before} samples" in log
    meta, recs, head, layer = load_results(out)
    assert [r["sid"] for r in recs] == [f"m{i}" for i in range(n)]
    assert _index_lines(out) == n  # nothing recomputed or appended twice
    # equal to an uninterrupted run
    samples, _ = load_samples(data)
    ref = str(tmp_path / "ref")
    sweep(load_model("tiny-llava"), samples, ref, batch_size=3, overlays=0, report=False, progress=False, log=_quiet)
    _, recs_ref, head_ref, layer_ref = load_results(ref)
    np.testing.assert_allclose(head, head_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer, layer_ref, rtol=1e-5, atol=1e-6)


def test_torchrun_gloo_two_processes_equal_one(tmp_path):
    n = 7
    data = _write_manifest(tmp_path, n, seed=3)
    out = str(tmp_path / "out2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vgkernels", "sweep", "--model", "tiny-llava", "--workers", "0", "--no-progress",
           "--overlays", "2", "--data", data, "--out", out, "--batch-size", "2"]
    res = subprocess.run(cmd, env=_env(), cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         timeout=300)
    log = res.stdout.decode()
    assert res.returncode == 0, log
    assert "on rank 0 of 2" in log
    shards = os.path.join(out, "shards")
    lines = [sum(1 for _ in open(os.path.join(shards, f"index.r{r}.jsonl"))) for r in (0, 1)]
    assert lines == [4, 3]  # every rank wrote its own share
    assert os.path.getsize(os.path.join(out, "plots", "layers.png")) > 0
    meta, recs, head, layer = load_results(out)
    samples, _ = load_samples(data)
    one = str(tmp_path / "out1")
    sweep(load_model("tiny-llava"), samples, one, batch_size=2, overlays=2, report=False, progress=False,
          log=_quiet)
    meta1, recs1, head1, layer1 = load_results(one)
    assert [r["sid"] for r in recs] == [r["sid"] for r in recs1] == [f"m{i}" for i in range(n)]
    np.testing.assert_allclose(head, head1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer, layer1, rtol=1e-5, atol=1e-6)
    # raw maps of the overlay samples came back from whichever rank computed them
    for r, r1 in zip(recs[:2], recs1[:2]):
        a, b = read_maps(out, r, meta["L"], meta["H"]), read_maps(one, r1, meta1["L"], meta1["H"])
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
