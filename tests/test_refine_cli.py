"""``vgkernels refine``: scoring rules, data rows, records, summary and resume."""
import json
import os

import pytest

from vgkernels.refine import eval as RE
from vgkernels.cli import main

HEADS = "2:1,1:0,3:3,1:2"


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("response,answer,ok", [
    ("Yes", "yes", True),
    ("yes, there is", "yes", True),        # answer in response
    ("liver", "the liver", True),          # response in answer
    ("  LIVER. ", "Liver", True),
    ("no", "yes", False),
    ("", "yes", False),                    # empty response is never right
    ("...", "yes", False),
    ("kidney", "liver", False),
    # whole words only: a word is never matched inside another
    ("not sure", "no", False),
    ("Normal", "no", False),
    ("I do not know", "no", False),
    ("The eyes", "yes", False),
    ("No, there is none.", "no", True),
    ("3.5 cm", "3.5 cm", True),
    ("about 3.5 cm wide", "3.5 cm", True),
    ("x-ray", "ray", False),
])
def test_short_answer_rule(response, answer, ok):
    assert RE.short_answer_correct(response, answer) is ok


OPTS = {"A": "Liver", "B": "Lung", "C": "Heart", "D": "Brain"}


@pytest.mark.parametrize("response,letter", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("D. Brain", "D"), ("The answer is A", "A"),
    ("answer: c", "C"), ("heart", "C"), ("I think it is the lung", "B"), ("none", None), ("", None),
    # the article "A" is not option A
    ("A lung.", "B"), ("A lung is shown", "B"), ("A. Liver", "A"), ("A", "A"), ("(A) liver", "A"),
    ("A) Liver", "A"), ("It is A", "A"), ("Lungs", None),
])
def test_choice_letter(response, letter):
    assert RE.choice_letter(response, OPTS) == letter


def test_prompts_follow_the_paper_templates():
    assert RE.format_prompt("Is there a fracture?") == (
        "Is there a fracture?\nAnswer the question using a single word or phrase.")
    assert RE.format_prompt("Which organ?", {"A": "Liver", "B": "Lung"}) == (
        "Which organ?\nA. Liver\nB. Lung\nAnswer with the option's letter from the given choices directly.")


def test_rows_parse_and_reject(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"image": "a.png", "question": "q?", "answer": "Lung", "options": ["Liver", "Lung"]})
                 + "\n" + json.dumps({"id": "x", "image": "/abs/b.png", "question": "q2?", "answer": "yes"}) + "\n")
    rows = RE.read_rows(str(p))
    assert rows[0].answer == "B" and rows[0].kind == "mc" and rows[0].image == str(tmp_path / "a.png")
    assert rows[1].id == "x" and rows[1].kind == "short" and rows[1].image == "/abs/b.png"
    bad = [
        ({"image": "a", "question": "q"}, "missing field 'answer'"),
        ({"image": "a", "question": "q", "answer": "E", "options": ["x", "y"]}, "neither an option letter"),
        ({"image": "a", "question": "q", "answer": "A", "options": {"AA": "x"}}, "single letters"),
    ]
    for obj, msg in bad:
        p.write_text(json.dumps(obj) + "\n")
        with pytest.raises(RE.DataError, match=msg):
            RE.read_rows(str(p))
    p.write_text("{not json\n")
    with pytest.raises(RE.DataError, match=":1: not valid JSON"):
        RE.read_rows(str(p))


def test_summary_counts_by_kind_and_letter():
    recs = [
        {"kind": "short", "answer": "yes", "results": {"baseline": {"correct": True}, "s": {"correct": False}}},
        {"kind": "mc", "answer": "A", "results": {"baseline": {"correct": False}, "s": {"correct": True}}},
        {"kind": "mc", "answer": "A", "results": {"baseline": {"correct": True}, "s": {"correct": True}}},
        {"kind": "mc", "answer": "C", "results": {"baseline": {"correct": False}, "s": {"correct": False}}},
    ]
    s = RE.summarize(recs, ["baseline", "s"])
    assert s["baseline"]["accuracy"] == 0.5 and s["s"]["accuracy"] == 0.5
    assert s["baseline"]["short"] == 1.0 and s["s"]["short"] == 0.0
    assert s["s"]["mc_by_letter"] == {"A": {"accuracy": 1.0, "n": 2}, "C": {"accuracy": 0.0, "n": 1}}
    table = RE.summary_table(s)
    assert "| s | 4 | 50.0 | 0.0 | 66.7 | 100.0 | 0.0 |" in table


# ----------------------------------------------------------------------------- the command


def _run(out, *extra):
    return main(["refine", "--model", "tiny-llava", "--heads", HEADS, "--layers", "2", "--max-new-tokens", "3",
                 "--batch-size", "3", "--no-progress", "--out", str(out), *extra])


def _records(out):
    with open(os.path.join(out, "records.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_cli_sweep_records_summary_and_resume(tmp_path, monkeypatch, capsys):
    from vgkernels.refine import VGRefine

    out = tmp_path / "run"
    data = RE.write_demo_data(str(tmp_path / "data"), 8, seed=3)
    calls = []
    orig = VGRefine.sweep

    def counting(self, images, questions, settings, **kw):
        calls.append(len(questions))
        if len(calls) == 2 and os.environ.get("CRASH_SECOND"):
            raise KeyboardInterrupt  # a crash after the first batch was written
        return orig(self, images, questions, settings, **kw)

    monkeypatch.setattr(VGRefine, "sweep", counting)
    monkeypatch.setenv("CRASH_SECOND", "1")
    assert _run(out, "--data", data, "--sweep-p", "30,70", "--sweep-k", "1,4") == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err
    first = _records(out)
    assert len(first) == 3 and calls == [3, 3]
    # a torn line, as left by a crash in the middle of a write
    with open(out / "records.jsonl", "a") as f:
        f.write('{"id": "q3", "res')
    monkeypatch.delenv("CRASH_SECOND")
    calls.clear()
    assert _run(out, "--data", data, "--sweep-p", "30,70", "--sweep-k", "1,4") == 0
    assert calls == [3, 2], "only the unfinished questions are recomputed"
    recs = _records(out)
    assert [r["id"] for r in recs] == [f"q{i}" for i in range(8)]
    assert recs[:3] == first
    rows = {r.id: r for r in RE.read_rows(data)}
    labels = ["baseline", "K=1 p=30 layers=2", "K=1 p=70 layers=2", "K=4 p=30 layers=2", "K=4 p=70 layers=2"]
    for r in recs:
        assert list(r["results"]) == labels
        for label, res in r["results"].items():
            assert res["correct"] == RE.is_correct(rows[r["id"]], res["response"])
        assert r["results"]["K=1 p=30 layers=2"]["kept"] > r["results"]["K=1 p=70 layers=2"]["kept"]
    summary = json.load(open(out / "summary.json"))["methods"]
    for label in labels:
        n_ok = sum(r["results"][label]["correct"] for r in recs)
        assert summary[label]["n"] == 8 and summary[label]["accuracy"] == n_ok / 8
    assert "| baseline | 8 |" in capsys.readouterr().out
    # a finished run started again recomputes nothing
    calls.clear()
    assert _run(out, "--data", data, "--sweep-p", "30,70", "--sweep-k", "1,4") == 0
    assert calls == [] and len(_records(out)) == 8
    # different settings in the same folder are refused
    capsys.readouterr()
    assert _run(out, "--data", data, "--sweep-p", "50") == 2
    assert "holds a run with different settings" in capsys.readouterr().err


def test_cli_demo_on_qwen(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["refine", "--model", "tiny-qwen2-vl", "--demo", "4", "--heads", HEADS, "--sweep-layers", "1;2,3",
                 "--max-new-tokens", "2", "--no-progress", "--out", str(out)]) == 0
    recs = _records(out)
    assert len(recs) == 4 and all(set(r["results"]) == {"baseline", "K=all p=50 layers=1", "K=all p=50 layers=2+3"}
                                  for r in recs)
    assert os.path.exists(out / "summary.md")


def test_sampling_options_need_do_sample(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["refine", "--model", "tiny-llava", "--demo", "2", "--heads", HEADS, "--layers", "2",
                 "--out", str(out), "--top-p", "0.9", "--temperature", "0.7", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--temperature, --top-p: sampling options; add --do-sample" in err
    assert not (out / "records.jsonl").exists()
