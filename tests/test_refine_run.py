"""``vgkernels refine`` never blocks a retry, rejects bad rows instead of aborting,
refuses heads ranked on another model and says where its files went."""
import csv
import json
import os

from vgkernels.cli import main
from vgkernels.refine import eval as RE

HEADS = "2:1,1:0,3:3,1:2"


def _run(out, *extra):
    return main(["refine", "--model", "tiny-llava", "--max-new-tokens", "2", "--batch-size", "4", "--no-progress",
                 "--out", str(out), *extra])


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_retry(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--demo", "3", "--heads", HEADS, "--layers", "99") == 2
    err = capsys.readouterr().err
    assert "layers" in err and "[0, 4)" in err and len(err.strip().splitlines()) == 1
    assert not (out / "run.json").exists()
    assert _run(out, "--demo", "3", "--heads", HEADS, "--layers", "2") == 0
    assert json.loads((out / "run.json").read_text())["settings"] == ["K=all p=50 layers=2"]


def test_bad_rows_are_rejected_and_missing_images_retried(tmp_path, capsys):
    data_dir = tmp_path / "data"
    data = RE.write_demo_data(str(data_dir), 3, seed=1)
    rows = [json.loads(t) for t in open(data)]
    lines = [json.dumps(r) for r in rows]
    lines.append(json.dumps({"id": "noanswer", "image": rows[0]["image"], "question": "q?"}))
    lines.append("{not json")
    lines.append(json.dumps({"id": "later", "image": "images/later.png", "question": "Is it?", "answer": "yes"}))
    with open(data, "w") as f:
        f.write("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert _run(out, "--data", data, "--heads", HEADS, "--layers", "2") == 0
    printed = capsys.readouterr().out
    recs = [json.loads(t) for t in open(out / "records.jsonl")]
    assert [r["id"] for r in recs] == ["q0", "q1", "q2"]
    rej = [json.loads(t) for t in open(out / "rejects.jsonl")]
    assert [(r["line"], r["kind"], r["retry"]) for r in rej] == [
        (4, "malformed row", False), (5, "malformed row", False), (6, "missing image", True)]
    assert rej[0]["error"].startswith("missing field 'answer'")  # the place is in source/line, not repeated
    assert "3 rejected (see rejects.jsonl); 1 with a missing or unreadable image will be tried again" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["baseline"]["n"] == 3
    # the image appears: the next run answers that question only
    from vgkernels.integrations.tiny import test_image

    test_image(48, 48).save(data_dir / "images" / "later.png")
    assert _run(out, "--data", data, "--heads", HEADS, "--layers", "2") == 0
    assert [json.loads(t)["id"] for t in open(out / "records.jsonl")] == ["q0", "q1", "q2", "later"]
    assert [json.loads(t)["line"] for t in open(out / "rejects.jsonl")] == [4, 5]


def _heads_json(path, **meta):
    doc = {"heads": [{"layer": 2, "head": 1}, {"layer": 1, "head": 0}], "metric": "kl_ref", **meta}
    path.write_text(json.dumps(doc))
    return str(path)


def test_heads_ranked_on_another_model_are_refused(tmp_path, capsys):
    shape = {"model_type": "llava", "num_layers": 4, "num_heads": 4, "hidden_size": 64}
    other = _heads_json(tmp_path / "big.json", model="/ckpt/llava-1.5-7b-hf", model_type="llava", num_layers=32,
                        num_heads=32, hidden_size=4096)
    assert _run(tmp_path / "a", "--demo", "2", "--heads", other, "--layers", "2") == 2
    err = capsys.readouterr().err
    assert "was ranked on another model: num_layers 32 (this model: 4); num_heads 32 (this model: 4)" in err
    assert not (tmp_path / "a" / "run.json").exists()
    # same shape, another model's name: refused unless asked for
    named = _heads_json(tmp_path / "named.json", model="tiny-qwen2-vl", **shape)
    assert _run(tmp_path / "b", "--demo", "2", "--heads", named, "--layers", "2") == 2
    assert "--heads-from-any-model" in capsys.readouterr().err
    assert _run(tmp_path / "b", "--demo", "2", "--heads", named, "--layers", "2", "--heads-from-any-model") == 0
    # this model's heads.json, and a bare list without metadata, are used
    mine = _heads_json(tmp_path / "mine.json", model="tiny-llava", **shape)
    assert _run(tmp_path / "c", "--demo", "2", "--heads", mine, "--layers", "2") == 0


def test_sweep_writes_an_accuracy_table_and_plot_and_says_where(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--demo", "3", "--heads", HEADS, "--sweep-k", "1,4", "--sweep-p", "30,70",
                "--sweep-layers", "2;1,3") == 0
    printed = capsys.readouterr().out
    with open(out / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 + 2 * 2 * 2 and rows[0]["method"] == "baseline"
    assert {r["layers"] for r in rows[1:]} == {"2", "1+3"}
    assert os.path.getsize(out / "accuracy.png") > 0
    for name in ("accuracy.csv", "accuracy.png", "records.jsonl", "summary.md", "rejects.jsonl"):
        assert str(out / name) in printed
