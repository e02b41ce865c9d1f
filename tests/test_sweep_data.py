"""Sweep inputs and outputs that need no model: readers, rejects, shards, heads, plots."""
import json
import os

import numpy as np
import pytest
import torch

from vgkernels.presets import resolve_heads
from vgkernels.sweep import heads as heads_mod
from vgkernels.sweep import report
from vgkernels.sweep.datasets import LOCALISATION_TEMPLATES, Sample, load_samples, resolve_image
from vgkernels.sweep.store import (METRICS, SampleResult, ShardWriter, check_or_write_meta, decode_maps, done_ids,
                                   encode_maps, load_results, merge)

# The project's shared/ folder sits beside the repository (CI clones main next to it).
OFFICIAL = os.environ.get("VGKERNELS_OFFICIAL_DATA") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "official")


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_official_files_parse_completely():
    names = sorted(os.listdir(OFFICIAL))
    assert len(names) == 4
    for name in names:
        samples, rejects = load_samples(os.path.join(OFFICIAL, name), image_root="/imgs",
                                        image_pattern="{image}.jpg")
        assert rejects == [], rejects[:3]
        assert len(samples) == 1388
        assert [s.index for s in samples] == list(range(1388))
        assert len({s.sid for s in samples}) == 1388
        s = samples[0]
        assert s.image == f"/imgs/{s.fields['image_id']}.jpg"
        assert s.gt_tokens and s.boxes and s.fields["label"]
        if name.startswith("VGMED"):
            assert {"modality", "location"} <= set(s.fields)
        if "localization" in name:
            # every localisation question is one of the paper's templates
            for s in samples[:50]:
                assert any(s.question == t.format(label=s.fields["label"]) or
                           s.question.lower() == t.format(label=s.fields["label"]).lower()
                           for t in LOCALISATION_TEMPLATES), s.question


def test_image_pattern_with_int_ids(tmp_path):
    (tmp_path / "COCO_val2014_000000094871.jpg").write_bytes(b"x")
    assert resolve_image(94871, str(tmp_path), "COCO_val2014_{image:012d}.jpg").endswith("000000094871.jpg")
    (tmp_path / "xmlab1").mkdir()
    (tmp_path / "xmlab1" / "source.jpg").write_bytes(b"x")
    assert resolve_image("xmlab1", str(tmp_path), "{image}/source.jpg") == str(tmp_path / "xmlab1" / "source.jpg")
    (tmp_path / "abc.png").write_bytes(b"x")
    assert resolve_image("abc", str(tmp_path)) == str(tmp_path / "abc.png")  # extension probing
    with pytest.raises(ValueError, match="cannot format"):
        resolve_image("abc", str(tmp_path), "{image:012d}.jpg")


def test_malformed_rows_are_rejected_with_reasons(tmp_path):
    good = {"image": "a", "label": "liver", "question": "Is there a liver?", "bbox": [[1, 2, 3, 4]],
            "modality": "CT"}
    rows = [good,
            "{not json",
            {"image": "b", "question": "q?"},                                       # no bbox
            {"image": "c", "question": "q?", "bbox": [[1, 2, -3, 4]]},              # negative width
            {"image": "d", "question": "", "bbox": [[1, 2, 3, 4]]},                 # empty question
            {"image": "e", "question": "q?", "bbox": [[1, 2, 3, 4]], "gt_tokens": [[30, 1]]},  # off grid
            dict(good, image="f")]
    p = tmp_path / "q.jsonl"
    _write_jsonl(p, rows)
    samples, rejects = load_samples(str(p), fmt="official", image_root=str(tmp_path))
    assert [s.fields["image_id"] for s in samples] == ["a", "f"]
    assert [s.index for s in samples] == [0, 1]
    assert [r.line for r in rejects] == [2, 3, 4, 5, 6]
    msgs = [r.error for r in rejects]
    assert "not valid JSON" in msgs[0]
    assert "missing field 'bbox'" in msgs[1]
    assert "w, h >= 0" in msgs[2]
    assert "question" in msgs[3]
    assert "outside the 24x24 grid" in msgs[4]


def test_manifest_carries_extra_fields_and_ids(tmp_path):
    rows = [{"id": "s1", "image": "img/1.png", "boxes": [[0, 0, 5, 5]], "question": "Where?", "modality": "MRI",
             "site": 3},
            {"image": "/abs/2.png", "bbox": [[1, 1, 2, 2]], "question": "What?", "label": "x"},
            {"id": "s1", "image": "img/3.png", "boxes": [[0, 0, 5, 5]], "question": "Dup?"}]
    p = tmp_path / "m.jsonl"
    _write_jsonl(p, rows)
    samples, rejects = load_samples(str(p))  # auto-detected as a manifest ("boxes")
    assert [s.sid for s in samples][0] == "s1"
    assert samples[0].image == str(tmp_path / "img" / "1.png")
    assert samples[0].fields == {"modality": "MRI", "site": 3}
    assert samples[0].boxes == [[0.0, 0.0, 5.0, 5.0]]
    assert samples[1].image == "/abs/2.png" and samples[1].fields == {"label": "x"}
    assert len(rejects) == 1 and "duplicate sample id 's1'" in rejects[0].error
    # ids are stable across reads (resume relies on it)
    again, _ = load_samples(str(p))
    assert [s.sid for s in again] == [s.sid for s in samples]


def test_coco_instances_become_localisation_questions(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "000007.jpg", "width": 100, "height": 80},
                       {"id": 9, "file_name": "000009.jpg", "width": 50, "height": 50}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 2, 10, 20], "iscrowd": 0},
                            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [30, 30, 5, 5], "iscrowd": 0},
                            {"id": 3, "image_id": 7, "category_id": 2, "bbox": [0, 0, 50, 50], "iscrowd": 1},
                            {"id": 4, "image_id": 9, "category_id": 2, "bbox": [3, 3, 10, 10], "iscrowd": 0},
                            {"id": 5, "image_id": 99, "category_id": 2, "bbox": [3, 3, 10, 10]},
                            {"id": 6, "image_id": 9, "category_id": 1, "bbox": [3, 3, "a", 10]}]}
    p = tmp_path / "instances_val2017.json"
    p.write_text(json.dumps(coco))
    samples, rejects = load_samples(str(p), image_root=str(tmp_path / "val2017"), seed=3)
    assert [(s.sid, len(s.boxes)) for s in samples] == [("coco:7:1", 2), ("coco:9:2", 1)]
    assert samples[0].boxes == [[1.0, 2.0, 10.0, 20.0], [30.0, 30.0, 5.0, 5.0]]
    assert samples[0].image == str(tmp_path / "val2017" / "000007.jpg")
    assert samples[0].question in {t.format(label="cat") for t in LOCALISATION_TEMPLATES}
    assert samples[1].question in {t.format(label="dog") for t in LOCALISATION_TEMPLATES}
    assert sorted(r.error.split(": ", 1)[1][:8] for r in rejects) == ["bbox mus", "image_id"]
    # the template choice is a pure function of (seed, sample)
    again, _ = load_samples(str(p), image_root=str(tmp_path / "val2017"), seed=3)
    assert [s.question for s in again] == [s.question for s in samples]


def test_encoded_maps_round_trip(gen):
    L, H, N = 3, 2, 7
    q = torch.rand(L, H, N, generator=gen).numpy() * 1e-6  # far below float16's normal range
    r = torch.rand(L, H, N, generator=gen).numpy()
    cells = torch.rand(N, 4, generator=gen).numpy()
    q2, r2, c2 = decode_maps(encode_maps(q, r, cells), L, H, N)
    np.testing.assert_allclose(q2, q, rtol=1e-3)
    np.testing.assert_allclose(r2, r, rtol=1e-3)
    np.testing.assert_array_equal(c2, cells.astype(np.float32))


def _fake_results(n, L, H, rng, start=0, maps=False):
    out = []
    for i in range(start, start + n):
        s = Sample(i, f"s{i}", f"/nope/{i}.png", f"question {i}?", [[1.0, 1.0, 4.0, 4.0]],
                   fields={"modality": ["CT", "MRI"][i % 2], "label": "x"})
        head = rng.random((6, L, H)).astype(np.float32)
        layer = rng.random((6, L)).astype(np.float32)
        m = [rng.random((L, H, 4)).astype(np.float32) for _ in range(2)] if maps else [None, None]
        cells = np.array([[0, 0, 4, 4], [4, 0, 8, 4], [0, 4, 4, 8], [4, 4, 8, 8]], np.float32) if maps else None
        out.append(SampleResult(s, head, layer, 4, (2, 2), "bbox", 1, (8, 8), m[0], m[1], cells))
    return out


def _meta(out, L, H, layers=None):
    check_or_write_meta(str(out), {"L": L, "H": H, "model": "hand-made", "fingerprint": {"x": 1},
                                   "layers": layers or list(range(L))}, write=True)


def test_shards_survive_a_torn_tail_and_merge_in_dataset_order(tmp_path):
    L, H = 3, 2
    rng = np.random.default_rng(0)
    _meta(tmp_path, L, H)
    res = _fake_results(5, L, H, rng, maps=True)
    w = ShardWriter(str(tmp_path), 1, L, H)
    w.append(res[3:5])
    w.append(res[0:1])
    w.close()
    # a crash mid-write: half an index line and stray binary bytes
    shard = tmp_path / "shards"
    with open(shard / "index.r1.jsonl", "ab") as f:
        f.write(b'{"sid": "s9", "ro')
    with open(shard / "heads.r1.f32", "ab") as f:
        f.write(b"\0" * 10)
    with open(shard / "maps.r1.bin", "ab") as f:
        f.write(b"\1" * 33)
    w = ShardWriter(str(tmp_path), 1, L, H)  # repairs
    assert w.rows == 3
    assert os.path.getsize(shard / "heads.r1.f32") == 3 * 6 * L * H * 4
    w.close()
    w0 = ShardWriter(str(tmp_path), 0, L, H)
    w0.append(res[1:3])
    w0.close()
    assert done_ids(str(tmp_path)) == {f"s{i}" for i in range(5)}
    info = merge(str(tmp_path), parse_rejects=[])
    assert info == {"samples": 5, "rejects": 0}
    meta, recs, head, layer = load_results(str(tmp_path))
    assert [r["sid"] for r in recs] == [f"s{i}" for i in range(5)]
    for i in range(5):
        np.testing.assert_array_equal(head[i], res[i].head)
        np.testing.assert_array_equal(layer[i], res[i].layer)
        np.testing.assert_allclose(recs[i]["kl"], res[i].layer[1], rtol=1e-6)
    from vgkernels.sweep.store import read_maps

    mq, mr, cells = read_maps(str(tmp_path), recs[4], L, H)
    np.testing.assert_allclose(mq, res[4].maps_q, rtol=1e-3)


def test_meta_mismatch_refuses_to_mix(tmp_path):
    _meta(tmp_path, 2, 2)
    with pytest.raises(ValueError, match="other settings"):
        check_or_write_meta(str(tmp_path), {"fingerprint": {"x": 2}}, write=True)


def _hand_made_sweep(path, L=4, H=3, n=6, layers=None):
    """Head metrics whose mean KL (raw and /ref) has a known order."""
    _meta(path, L, H, layers)
    rng = np.random.default_rng(1)
    res = _fake_results(n, L, H, rng, maps=True)
    base = np.arange(L * H, dtype=np.float32).reshape(L, H)[::-1, ::-1].copy()  # (L-1, H-1) is best
    for i, r in enumerate(res):
        r.head[1] = base + 0.01 * i
        r.head[4] = base.T[::-1].T.copy() * 2 + 0.01 * i  # per-row reversed: best is (L-1, 0)
    res[0].head[1, 0, 0] = np.nan  # a NaN sample is left out of its head's mean
    w = ShardWriter(str(path), 0, L, H)
    w.append(res)
    w.close()
    merge(str(path), parse_rejects=[])
    return base


def test_heads_ranking_on_hand_made_results(tmp_path, capsys):
    import argparse

    base = _hand_made_sweep(tmp_path)
    p = argparse.ArgumentParser()
    heads_mod.add_arguments(p)
    heads_mod.run(p.parse_args(["--sweep", str(tmp_path), "--top-k", "5", "--metric", "kl"]))
    doc = json.loads((tmp_path / "heads.json").read_text())
    L, H = base.shape
    expect = sorted(((base[l, h], l, h) for l in range(L) for h in range(H)))[:5]
    assert [(d["layer"], d["head"]) for d in doc["heads"]] == [(l, h) for _, l, h in expect]
    assert resolve_heads(str(tmp_path / "heads.json")) == [(l, h) for _, l, h in expect]
    assert doc["heads"][0]["score"] == pytest.approx(base[L - 1, H - 1] + 0.01 * 2.5, rel=1e-5)
    # default metric: reference-normalised KL
    heads_mod.run(p.parse_args(["--sweep", str(tmp_path), "--top-k", "2", "--out", str(tmp_path / "h2.json")]))
    doc2 = json.loads((tmp_path / "h2.json").read_text())
    assert doc2["metric"] == "kl_ref"
    assert [(d["layer"], d["head"]) for d in doc2["heads"]] == [(L - 1, 0), (L - 1, 1)]
    # NaN handling: head (0, 0) averaged over the 5 finite samples only
    ranked = heads_mod.rank_heads(np.load(tmp_path / "head_metrics.npy"), "kl", L * H)
    d = {(l, h): (s, n) for l, h, s, n in ranked}
    assert d[(0, 0)][1] == 5 and d[(0, 0)][0] == pytest.approx(base[0, 0] + 0.01 * 3, rel=1e-5)
    # --where filters on carried fields
    heads_mod.run(p.parse_args(["--sweep", str(tmp_path), "--top-k", "1", "--where", "modality=MRI",
                                "--out", str(tmp_path / "h3.json")]))
    assert json.loads((tmp_path / "h3.json").read_text())["samples"] == 3
    with pytest.raises(ValueError, match="no sample"):
        heads_mod.run(p.parse_args(["--sweep", str(tmp_path), "--where", "modality=PET"]))


def test_report_tables_and_plots(tmp_path):
    from PIL import Image

    _hand_made_sweep(tmp_path)
    res = report.write_report(str(tmp_path), overlays=2)
    paths = res["paths"]
    for key in ("layers_png", "heads_png", "overlays_png"):
        assert os.path.getsize(paths[key]) > 5000, key
        with Image.open(paths[key]) as im:
            arr = np.asarray(im.convert("L"))
        assert arr.std() > 5, f"{key} looks blank"
    import csv

    rows = list(csv.DictReader(open(paths["layers_csv"])))
    groups = {(r["field"], r["value"]) for r in rows}
    assert {("all", "all"), ("modality", "CT"), ("modality", "MRI")} <= groups
    assert ("label", "x") not in groups  # one distinct value: nothing to break down
    meta, recs, head, layer = load_results(str(tmp_path))
    ct = [i for i, r in enumerate(recs) if r["fields"]["modality"] == "CT"]
    r0 = next(r for r in rows if r["field"] == "modality" and r["value"] == "CT" and r["layer"] == "2")
    for j, name in enumerate(METRICS):
        assert float(r0[name]) == pytest.approx(float(np.nanmean(layer[ct, j, 2])), rel=1e-5)
    hrows = list(csv.DictReader(open(paths["heads_csv"])))
    assert len([r for r in hrows if r["field"] == "all"]) == head.shape[2] * head.shape[3]
    assert "per-layer grounding over 6 samples" in res["text"]


def test_heads_and_tables_name_the_swept_decoder_layers(tmp_path):
    import argparse
    import csv

    layers = [3, 8, 9, 20]
    _hand_made_sweep(tmp_path, layers=layers)
    p = argparse.ArgumentParser()
    heads_mod.add_arguments(p)
    heads_mod.run(p.parse_args(["--sweep", str(tmp_path), "--top-k", "2", "--metric", "kl"]))
    assert resolve_heads(str(tmp_path / "heads.json")) == [(20, 2), (20, 1)]
    res = report.write_report(str(tmp_path), overlays=0)
    assert [r["layer"] for r in csv.DictReader(open(res["paths"]["layers_csv"])) if r["field"] == "all"] == \
        [str(l) for l in layers]
