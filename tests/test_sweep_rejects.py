"""A sweep fails loudly when nothing can work, rejects what is the data's fault (and
retries what may be fixed), and stops on everything else."""
import csv
import json
import math
import os

import numpy as np
import pytest

from sweep_fake import a_reject, fake_sweep, one_thread
from vgkernels.cli import main
from vgkernels.integrations.loaders import load_model
from vgkernels.sweep.command import sweep
from vgkernels.sweep.datasets import load_samples
from vgkernels.sweep.runner import MapRunner
from vgkernels.sweep.store import load_results
from vgkernels.integrations.tiny import test_image as make_image

_BUNDLE = {}


def tiny():
    if "b" not in _BUNDLE:
        _BUNDLE["b"] = load_model("tiny-llava")
    return _BUNDLE["b"]


_one_thread = pytest.fixture(autouse=True)(one_thread)


def _manifest(tmp_path, rows, name="m.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def _row(i, image, box=(4, 6, 24, 20), **kw):
    return {"id": f"m{i}", "image": image, "boxes": [list(box)], "question": "Is there a shape?", **kw}


def _run(bundle, data, out, logs=None, **kw):
    samples, rejects = load_samples(data)
    kw.setdefault("batch_size", 4)
    return sweep(bundle, samples, str(out), parse_rejects=rejects, overlays=0, report=kw.pop("report", False),
                 progress=False, log=(logs.append if logs is not None else (lambda *a: None)), **kw)


def test_missing_image_root_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import vgkernels.integrations.loaders as L

    monkeypatch.setattr(L, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    data = _manifest(tmp_path, [_row(0, "a.png")])
    root = tmp_path / "no-such-folder"
    assert main(["sweep", "--data", data, "--image-root", str(root), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"vgkernels sweep: error: --image-root: {str(root)!r} does not exist"
    assert not (tmp_path / "o").exists()


def test_a_first_batch_without_images_stops_the_run(tmp_path, capsys):
    make_image(56, 56).save(tmp_path / "a.png")
    rows = [_row(0, "a.png")] + [_row(i, f"missing{i}.png") for i in range(1, 4)]
    data = _manifest(tmp_path, rows)
    out = tmp_path / "o"
    assert main(["sweep", "--model", "tiny-llava", "--data", data, "--out", str(out), "--no-progress",
                 "--batch-size", "4", "--workers", "0", "--no-report", "--overlays", "0"]) == 1
    err = capsys.readouterr().err
    assert "3 of the first 4 samples have no readable image, e.g. cannot read image" in err
    assert "missing1.png" in err and "--image-root" in err
    assert not (out / "samples.jsonl").exists()  # no merged "result" of a run that could not work


def test_rejects_are_counted_and_missing_images_retried(tmp_path):
    make_image(56, 56, seed=1).save(tmp_path / "a.png")
    make_image(56, 56, seed=2).save(tmp_path / "b.png")
    rows = [_row(0, "a.png"), _row(1, "later.png"), _row(2, "b.png", box=(200, 200, 10, 10)), _row(3, "b.png"),
            _row(4, "a.png")]
    data = _manifest(tmp_path, rows)
    out = tmp_path / "o"
    logs = []
    res = _run(tiny(), data, out, logs, batch_size=5)
    assert res["merged"]["samples"] == 3 and res["merged"]["rejects"] == 2
    text = "\n".join(logs)
    assert "2 rejected (see rejects.jsonl); 1 with a missing or unreadable image will be tried again" in text
    assert "1 x missing image, e.g." in text and "later.png" in text
    assert "1 x box outside the image, e.g." in text
    # the next run tries the missing image again, not the bad box
    logs.clear()
    res = _run(tiny(), data, out, logs, batch_size=5)
    assert "resuming: 4 samples already done" in "\n".join(logs) and res["done"] == 1
    rej = [json.loads(t) for t in open(out / "rejects.jsonl")]
    assert sorted((r["sid"], r["kind"], r["retry"]) for r in rej) == [
        ("m1", "missing image", True), ("m2", "box outside the image", False)]
    # the image appears: the sample is computed and leaves rejects.jsonl
    make_image(56, 56, seed=3).save(tmp_path / "later.png")
    res = _run(tiny(), data, out, batch_size=5)
    assert res["done"] == 1 and res["merged"]["samples"] == 4
    _, recs, head, _ = load_results(str(out))
    assert [r["sid"] for r in recs] == ["m0", "m1", "m3", "m4"] and np.isfinite(head).all()
    rej = [json.loads(t) for t in open(out / "rejects.jsonl")]
    assert [r["sid"] for r in rej] == ["m2"]


def test_boxes_outside_the_image_or_the_crop_are_rejects_and_counts_agree(tmp_path):
    make_image(56, 56, seed=1).save(tmp_path / "sq.png")
    make_image(112, 56, seed=2).save(tmp_path / "wide.png")  # tiny-llava resizes to 56 high, crops the centre 56
    rows = [_row(0, "sq.png"), _row(1, "sq.png", box=(60, 10, 5, 5)),  # right of the 56-wide image
            _row(2, "wide.png", box=(2, 10, 20, 20)),  # on the left third: cropped away
            _row(3, "wide.png", box=(40, 10, 30, 20)),  # straddles the crop: the visible part counts
            _row(4, "sq.png", box=(50, 50, 30, 30))]  # sticks out of the image: the part inside counts
    data = _manifest(tmp_path, rows)
    out = tmp_path / "o"
    logs = []
    res = _run(tiny(), data, out, logs, report=True)
    rej = {r["sid"]: r for r in map(json.loads, open(out / "rejects.jsonl"))}
    assert rej["m1"]["kind"] == "box outside the image" and "56x56" in rej["m1"]["error"]
    assert rej["m2"]["kind"] == "box outside what the model sees"
    assert "cover x 28.0..84.0" in rej["m2"]["error"] and "112x56" in rej["m2"]["error"]
    assert not any(r["retry"] for r in rej.values())
    _, recs, head, layer = load_results(str(out))
    assert [r["sid"] for r in recs] == ["m0", "m3", "m4"] and np.isfinite(layer).all()
    assert "merged 3 samples, 2 rejects" in "\n".join(logs)
    with open(out / "summary" / "layers.csv") as f:
        ns = {int(r["n"]) for r in csv.DictReader(f) if r["field"] == "all"}
    assert ns == {3}  # the table's n is the console's count: no sample with empty metrics


def test_errors_that_are_not_the_samples_fault_stop_the_sweep(tmp_path, monkeypatch):
    make_image(56, 56).save(tmp_path / "a.png")
    data = _manifest(tmp_path, [_row(i, "a.png") for i in range(4)])
    orig = MapRunner.run

    def failing(self, items):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(MapRunner, "run", failing)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        _run(tiny(), data, tmp_path / "o1")
    assert not os.path.exists(tmp_path / "o1" / "rejects.jsonl")

    # a sample whose own data breaks the capture is rejected, the others are computed
    from vgkernels.sweep.datasets import SampleError

    def one_bad(self, items):
        bad = [b for b, it in enumerate(items) if it.sample.sid == "m2"]
        if bad:
            raise SampleError("capture did not apply: sample has two images", "capture failed", bad)
        return orig(self, items)

    monkeypatch.setattr(MapRunner, "run", one_bad)
    res = _run(tiny(), data, tmp_path / "o2")
    assert res["merged"]["samples"] == 3
    rej = [json.loads(t) for t in open(tmp_path / "o2" / "rejects.jsonl")]
    assert [(r["sid"], r["kind"]) for r in rej] == [("m2", "capture failed")]


def test_report_group_by_needs_a_field_that_exists(tmp_path, capsys):
    fake_sweep(tmp_path / "s")
    assert main(["report", "--sweep", str(tmp_path / "s"), "--group-by", "modalty", "--overlays", "0"]) == 2
    err = capsys.readouterr().err
    assert "--group-by: no sample has the field(s) ['modalty']; the samples carry ['modality']" in err
    assert main(["report", "--sweep", str(tmp_path / "s"), "--group-by", "modality", "--overlays", "0"]) == 0


def test_heads_of_a_sweep_where_every_sample_was_rejected(tmp_path, capsys):
    fake_sweep(tmp_path / "s", n=0, rejects=[a_reject(0), a_reject(1)])
    assert main(["heads", "--sweep", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "no sample has a finite kl_ref" in err and "rejects.jsonl" in err
    assert not (tmp_path / "s" / "heads.json").exists()
    fake_sweep(tmp_path / "t", n=3, nan_rows=(0, 1, 2))
    assert main(["heads", "--sweep", str(tmp_path / "t")]) == 1


def test_heads_json_is_valid_json_with_the_models_shape(tmp_path):
    def no_score(head, layer):
        head[:, 4, 0, 0] = np.nan  # a head with no finite kl_ref ranks last, with a null score

    fake_sweep(tmp_path / "s", n=4, L=3, H=4, layers=[2, 5, 7], num_layers=8, edit=no_score)
    assert main(["heads", "--sweep", str(tmp_path / "s"), "--top-k", "12"]) == 0
    text = (tmp_path / "s" / "heads.json").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert {k: doc[k] for k in ("model", "model_type", "num_layers", "num_heads", "hidden_size")} == {
        "model": "fake-model", "model_type": "llava", "num_layers": 8, "num_heads": 4, "hidden_size": 64}
    assert all(h["layer"] in (2, 5, 7) for h in doc["heads"])
    assert doc["heads"][-1] == {"layer": 2, "head": 0, "score": None, "n": 0}
    assert all(math.isfinite(h["score"]) for h in doc["heads"][:-1])


def test_a_data_file_with_no_usable_row_stops_before_the_model_and_leaves_no_settings(tmp_path, monkeypatch, capsys):
    """An --image-pattern that cannot format the ids rejects every row while parsing:
    exit 1 with the reason, no model loaded, and the corrected command then runs in the
    same --out (no settings of the failed start block it)."""
    import vgkernels.integrations.loaders as L

    make_image(56, 56).save(tmp_path / "a.png")
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"image": "a", "question": "Is there a shape?", "bbox": [[4, 6, 24, 20]]}) + "\n")
    out = tmp_path / "o"
    real = L.load_model
    monkeypatch.setattr(L, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = ["sweep", "--model", "tiny-llava", "--data", str(data), "--image-root", str(tmp_path), "--out", str(out),
            "--no-progress", "--workers", "0", "--no-report", "--overlays", "0"]
    assert main(args + ["--image-pattern", "{img}.png"]) == 1
    err = capsys.readouterr().err
    assert "--data: no usable sample in" in err and "1 rows rejected (1 x malformed row)" in err
    assert "cannot format image id 'a'" in err and not (out / "meta.json").exists()
    monkeypatch.setattr(L, "load_model", real)
    assert main(args + ["--image-pattern", "{image}.png"]) == 0
    assert len(load_results(str(out))[1]) == 1


def test_bad_boxes_are_rejected_as_bad_box(tmp_path):
    rows = [_row(0, "a.png", box=(4, 6, -1, 20)), {**_row(1, "a.png"), "boxes": [[1, 2, float("nan"), 3]]},
            _row(2, "a.png")]
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN written as the bare NaN JSON allows
    samples, rejects = load_samples(str(p))
    assert [s.sid for s in samples] == ["m2"]
    assert [(r.line, r.kind) for r in rejects] == [(1, "bad box"), (2, "bad box")]


@pytest.mark.parametrize("argv,message", [
    (["--limit", "-1"], "argument --limit: expected an integer >= 1, got -1"),
    (["--limit", "0"], "argument --limit: expected an integer >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--backend", "nope"], "argument --backend: invalid choice: 'nope'"),
    (["--device", "nope"], "--device: 'nope' is not a torch device"),
    (["--model", "tiny-llava:foo=1"], "--model: unknown size keyword 'foo' in 'tiny-llava:foo=1'"),
    (["--model", "no/such/dir"], "--model: 'no/such/dir' is neither a built-in tiny model"),
])
@pytest.mark.parametrize("command", ["sweep", "refine"])
def test_usage_errors_exit_2_before_anything_loads(tmp_path, monkeypatch, capsys, command, argv, message):
    import vgkernels.integrations.loaders as L

    monkeypatch.setattr(L, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    data = _manifest(tmp_path, [_row(0, "a.png")])
    base = (["sweep", "--data", data] if command == "sweep" else ["refine", "--demo", "2"]) + \
        ["--out", str(tmp_path / "o"), "--model", "tiny-llava"]
    try:
        code = main(base + argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_heads_out_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    fake_sweep(tmp_path / "s", n=3)
    mine = tmp_path / "questions.jsonl"
    mine.write_text('{"image": "x"}\n')
    assert main(["heads", "--sweep", str(tmp_path / "s"), "--top-k", "3", "--out", str(mine)]) == 2
    assert "exists and is not a heads file" in capsys.readouterr().err
    assert mine.read_text() == '{"image": "x"}\n'
    ranked = tmp_path / "h.json"
    assert main(["heads", "--sweep", str(tmp_path / "s"), "--top-k", "3", "--out", str(ranked)]) == 0
    assert main(["heads", "--sweep", str(tmp_path / "s"), "--top-k", "2", "--out", str(ranked)]) == 0  # re-rank
    assert len(json.loads(ranked.read_text())["heads"]) == 2


def test_data_that_is_not_a_question_file_is_a_usage_error(tmp_path, capsys):
    jsonl = _manifest(tmp_path, [_row(0, "a.png"), _row(1, "b.png")])
    binary = tmp_path / "b.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    cases = [
        (["--data", str(tmp_path)], "is a folder, not a file"),
        (["--data", jsonl, "--format", "coco"], "is not one JSON document"),
        (["--data", str(binary), "--format", "official"], "is not a text file"),
    ]
    for argv, message in cases:
        assert main(["sweep", "--model", "tiny-llava", "--out", str(tmp_path / "o"), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2-vl"])  # qwen: samples sorted by image size
def test_an_image_over_pils_pixel_limit_is_an_unreadable_image(tmp_path, monkeypatch, model):
    """PIL refuses images over its decompression-bomb limit (whole-slide scans) with an
    error that is not an OSError: the sample is an ``unreadable image`` reject, retried by
    the next run, and the others are swept."""
    from PIL import Image

    make_image(56, 56, seed=1).save(tmp_path / "small.png")
    make_image(200, 200, seed=2).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 200x200 is over twice the limit: refused
    rows = [_row(i, "small.png") for i in range(3)] + [_row(3, "huge.png")]
    data = _manifest(tmp_path, rows)
    samples, rejects = load_samples(data)
    res = sweep(load_model(model), samples, str(tmp_path / "o"), parse_rejects=rejects, overlays=0, report=False,
                progress=False, log=lambda *a: None, batch_size=4, workers=0)
    assert res["merged"]["samples"] == 3
    rej = [json.loads(t) for t in open(tmp_path / "o" / "rejects.jsonl")]
    assert [(r["sid"], r["kind"], r["retry"]) for r in rej] == [("m3", "unreadable image", True)]
    assert "exceeds limit" in rej[0]["error"]
