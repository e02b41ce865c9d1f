"""``--profile authors`` plumbing: prompts, cells, stored metrics, scoring, the authors'
evaluation files. (The end-to-end CLI runs are in test_llava_checkpoint.py.)"""
import json

import numpy as np
import pytest
import torch

from vgkernels import paper
from vgkernels.constants import ANSWER_LINE, REFERENCE_PROMPT
from vgkernels.layout import grid_layout
from vgkernels.refine import eval as RE
from vgkernels.sweep.datasets import Sample
from vgkernels.sweep.metrics import authors_cells, authors_layer_metrics


def test_cells_from_boxes_repeat_overlaps_and_gt_tokens_pass_through():
    lay = grid_layout((4, 4), (64, 64))  # 16-pixel cells
    s = Sample(0, "s", "", "q", boxes=[[0, 0, 32, 16], [16, 0, 32, 16]])
    # box 1 covers cells x = 0, 1 of row 0; box 2 covers x = 1, 2: cell (1, 0) is listed twice
    assert authors_cells(s, lay, "bbox") == [[0, 0], [1, 0], [1, 0], [2, 0]]
    g = Sample(0, "g", "", "q", boxes=[], gt_tokens=[[3, 3], [3, 3], [0, 1]])
    assert authors_cells(g, lay, "gt_tokens") == [[3, 3], [3, 3], [0, 1]]
    odd = grid_layout((4, 4), (64, 64))
    odd.N, odd.cells = 17, torch.cat([torch.full((1, 4), float("nan"), dtype=torch.float64), odd.cells])
    assert authors_cells(s, odd, "bbox") is None  # a CLS token: not one full grid


def test_stored_layer_metrics_are_the_authors_on_head_means():
    g = torch.Generator().manual_seed(0)
    q = torch.rand(3, 4, 16, generator=g)
    r = torch.rand(3, 4, 16, generator=g)
    cells = [[1, 1], [2, 1], [2, 1]]
    got = authors_layer_metrics(q, r, cells, (4, 4))
    assert got.shape == (6, 3) and got.dtype == np.float32
    a = paper.authors_metrics(q.double().mean(1), cells, grid=4)
    n = paper.authors_metrics(q.double().mean(1) / r.double().mean(1), cells, grid=4)
    want = torch.stack([a.ar, a.kl, a.js, n.ar, n.kl, n.js]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.isnan(authors_layer_metrics(q, r, None, (4, 4))).all()


def test_sweep_prompts_per_profile():
    from vgkernels.integrations.loaders import load_model
    from vgkernels.sweep.runner import Encoder

    b = load_model("tiny-splice", device="cpu")
    tok = b.processor.tokenizer
    for sep, profile in (("\n", "exact"), (" ", "authors")):
        enc = Encoder(b, REFERENCE_PROMPT, ANSWER_LINE, sep=sep)
        ids = b.processor.tokenizer_image_token(enc.ref_text)
        text = tok.decode([i for i in ids if i >= 0])
        want = paper.REFERENCE_PROMPT if profile == "authors" else REFERENCE_PROMPT + "\n" + ANSWER_LINE
        assert want in text
        if profile == "authors":
            assert b.chat(paper.question_prompt("Is it here?")) == b.chat("Is it here?" + " " + ANSWER_LINE)


def test_refine_prompts_and_scoring_per_profile():
    short = RE.VQARow("1", "x.png", " Is it? ", "yes", raw_answer=" yes")
    assert short.prompt() == "Is it?\n" + ANSWER_LINE
    assert short.prompt("authors") == " Is it? " + " " + ANSWER_LINE
    # " yes".capitalize() is " yes": not stripped, it neither holds nor is held by "Yes"
    assert RE.is_correct(short, "yes") and RE.is_correct(short, "yes", "authors") is False
    assert RE.is_correct(short, "", "authors") and not RE.is_correct(short, "")
    mc = RE.VQARow("2", "x.png", "Which?", "B", {"A": "liver", "B": "lung"})
    assert mc.prompt("authors") == paper.choice_prompt("Which?", {"A": "liver", "B": "lung"})
    # the authors' regex returns "b" as written, which is not the gold "B"
    assert RE.is_correct(mc, "The answer is b") and not RE.is_correct(mc, "The answer is b", "authors")
    assert RE.is_correct(mc, "the lung", "authors")
    with pytest.raises(ValueError, match="profile"):
        RE.format_prompt("q", {}, "paper")


def test_authors_evaluation_file_is_read(tmp_path):
    items = [
        {"question": "Is there a fracture?", "options": [], "answer": "no", "image": ["images/a.jpg"],
         "dataset_index": 7, "dataset_name": "VQA-RAD"},
        {"question": "Which organ?", "options": ["Liver", "Lung"], "answer": "Lung", "answer_label": "B",
         "image": ["images/b.jpg"], "dataset_index": 8, "dataset_name": "SLAKE"},
        {"question": "Which side?", "options": ["left", "right"], "answer": "right", "image": "images/c.jpg",
         "dataset_index": 9, "dataset_name": "VQA-RAD"},
    ]
    p = tmp_path / "eval.json"
    p.write_text(json.dumps(items, indent=2))
    rows = RE.read_rows(str(p))
    assert [r.id for r in rows] == ["7", "8", "9"] and [r.kind for r in rows] == ["short", "mc", "mc"]
    assert rows[0].image == str(tmp_path / "images" / "a.jpg") and rows[1].answer == "B" and rows[2].answer == "B"
    assert [r.id for r in RE.select_rows(rows, {"dataset_name": "VQA-RAD"}, str(p))] == ["7", "9"]
    with pytest.raises(RE.DataError, match=r"no row has \{'dataset_name': 'X'\}"):
        RE.select_rows(rows, {"dataset_name": "X"}, str(p))
    p.write_text(json.dumps([dict(items[0], image=["a.jpg", "b.jpg"])]))
    with pytest.raises(RE.DataError, match=":1: expected one image per question"):
        RE.read_rows(str(p))
    p.write_text("[{")
    with pytest.raises(RE.DataError, match="not valid JSON"):
        RE.read_rows(str(p))
