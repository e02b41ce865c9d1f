"""vgkernels.paper against the facts of the authors' released code (issue 11).

Expected numbers are computed here by plain loops written from those facts (not by
calling the code under test), on hand-made maps: duplicated cells, all-zero rows,
peaked maps, and random maps at the paper's 24x24 size.
"""
import difflib
import math

import numpy as np
import pytest
import torch

from vgkernels import constants, paper


# ----------------------------------------------------------------------------- prompts


def test_prompts_are_the_authors_strings():
    q = "  Is there a lesion in the liver? "
    assert paper.question_prompt(q) == q + " " + "Answer the question using a single word or phrase."
    assert paper.REFERENCE_PROMPT == ("Write a general description of the image. "
                                      "Answer the question using a single word or phrase.")
    assert paper.question_prompt("Q", "") == "Q"
    got = paper.choice_prompt("Which organ?", ["Liver", "Lung"])
    assert got == "Which organ?\nA. Liver\nB. Lung\nAnswer with the option's letter from the given choices directly."
    assert paper.choice_prompt("Q", {"A": "x", "C": "y"}) == "Q\nA. x\nC. y\n" + constants.CHOICE_LINE


# ----------------------------------------------------------------------------- metrics


def loop_metrics(maps, cells, gw):
    """The notebook's formulas, one number at a time. maps: (L, N) list of lists."""
    L, N = len(maps), len(maps[0])
    idx = [y * gw + x for x, y in cells]
    total = sum(sum(r) for r in maps)  # the whole sample, every layer
    in_box = set(idx)
    mask = [1.0 / len(in_box) if j in in_box else 0.0 for j in range(N)]
    ar, kl, js = [], [], []
    for row in maps:
        s = sum(row)
        ar.append(sum(row[i] for i in idx) / (s / N * len(idx) + 1e-8))
        k = 0.0
        for j in range(N):
            p = min(max(row[j] / (total + 1e-8), 1e-12), 1.0)
            m = min(max(mask[j], 1e-12), 1.0)
            k += m * math.log(m / p)
        kl.append(k)
        q = [v / (s + 1e-8) for v in row]
        a = b = 0.0
        for j in range(N):
            r = 0.5 * (q[j] + mask[j])
            a += q[j] * math.log((q[j] + 1e-8) / (r + 1e-8))
            b += mask[j] * math.log((mask[j] + 1e-8) / (r + 1e-8))
        js.append(0.5 * (a + b))
    return np.array(ar), np.array(kl), np.array(js)


def check(got, want, rtol=1e-6, atol=0.0):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy().astype(np.float64), w, rtol=rtol, atol=atol)


def test_duplicated_cells_count_twice_in_ar_only():
    maps = [[0.1, 0.4, 0.0, 0.2, 0.1, 0.0, 0.05, 0.1, 0.05],
            [0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.1, 0.1]]
    cells = [[0, 0], [1, 0], [1, 0]]  # cell (1, 0) listed twice
    got = paper.authors_metrics(torch.tensor(maps), cells, grid=3)
    # by hand, layer 0: (0.1 + 2·0.4) / (1.0/9·3 + 1e-8)
    assert float(got.ar[0]) == pytest.approx(0.9 / (1.0 / 9 * 3 + 1e-8), rel=1e-6)
    check(got, loop_metrics(maps, cells, 3))
    once = paper.authors_metrics(torch.tensor(maps), [[0, 0], [1, 0]], grid=3)
    assert float(once.ar[0]) == pytest.approx(0.5 / (1.0 / 9 * 2 + 1e-8), rel=1e-6)
    # KL and JS see a 0/1 mask: the duplicate does not change them
    torch.testing.assert_close(once.kl, got.kl)
    torch.testing.assert_close(once.js, got.js)


def test_kl_normalises_over_all_layers_of_the_sample():
    rng = np.random.default_rng(1)
    maps = rng.random((3, 16))
    cells = [[1, 1], [2, 1], [1, 2]]
    got = paper.authors_metrics(maps, cells, grid=4)
    check(got, loop_metrics(maps.tolist(), cells, 4))
    # Scaling another layer moves layer 0's KL (not its AR or JS): the normaliser is shared.
    other = maps.copy()
    other[2] *= 10
    moved = paper.authors_metrics(other, cells, grid=4)
    assert abs(float(moved.kl[0]) - float(got.kl[0])) > 1e-3
    assert float(moved.ar[0]) == pytest.approx(float(got.ar[0]), rel=1e-6)
    assert float(moved.js[0]) == pytest.approx(float(got.js[0]), rel=1e-6)


def test_zero_rows_give_ar_zero_and_finite_kl_js():
    maps = [[0.0] * 9, [0.0, 0.5, 0.5, 0, 0, 0, 0, 0, 0]]
    cells = [[1, 0], [2, 0]]
    got = paper.authors_metrics(torch.tensor(maps), cells, grid=3)
    assert float(got.ar[0]) == 0.0
    assert torch.isfinite(got.kl).all() and torch.isfinite(got.js).all()
    check(got, loop_metrics(maps, cells, 3), rtol=1e-6, atol=1e-7)
    # the zero row's JS by hand: q = 0, r = m/2 -> ½ Σ m log((m+ε)/(m/2+ε)) with m = ½ on two cells
    want = 0.5 * 2 * 0.5 * math.log((0.5 + 1e-8) / (0.25 + 1e-8))
    assert float(got.js[0]) == pytest.approx(want, rel=1e-6)
    # a whole sample of zeros stays finite too (the 1e-8 in the normaliser)
    z = paper.authors_metrics(np.zeros((2, 9)), cells, grid=3)
    assert torch.isfinite(z.kl).all() and (z.ar == 0).all()


def test_peaked_map_inside_the_box():
    maps = [[0.0] * 9, [0.0] * 9]
    maps[0][4] = 1.0          # all mass on the box's single cell
    maps[1][0] = 1.0          # all mass outside
    cells = [[1, 1]]
    got = paper.authors_metrics(np.array(maps), cells, grid=3)
    check(got, loop_metrics(maps, cells, 3), rtol=1e-6, atol=1e-7)
    assert float(got.ar[0]) == pytest.approx(9.0, rel=1e-6)  # 1 / (1/9 · 1)
    assert float(got.js[0]) < 1e-6 < float(got.js[1])
    # layer 0 holds half of the sample's mass: p = 0.5 at the box cell, KL ≈ log 2
    assert float(got.kl[0]) == pytest.approx(math.log(2), rel=1e-5)


def test_random_maps_at_paper_size_and_batches():
    rng = np.random.default_rng(0)
    B, L, N = 2, 6, 576
    maps = rng.dirichlet(np.ones(N) * 0.3, size=(B, L)).astype(np.float32)
    cells = [[[x, y] for x in range(3, 9) for y in range(10, 14)] + [[5, 12]],
             [[20, 1], [21, 1], [20, 2]]]
    got = paper.authors_metrics(torch.from_numpy(maps), cells)
    assert got.ar.shape == (B, L) and got.ar.dtype == torch.float32
    for b in range(B):
        want = loop_metrics(maps[b].astype(np.float64).tolist(), cells[b], 24)
        check([got.ar[b], got.kl[b], got.js[b]], want)
        one = paper.authors_metrics(maps[b], cells[b])
        torch.testing.assert_close(one.kl, got.kl[b])


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="gt_tokens: no cells"):
        paper.authors_metrics(np.ones((2, 9)), [], grid=3)
    with pytest.raises(ValueError, match=r"cell \[3, 0\] is outside the 3x3 grid"):
        paper.authors_metrics(np.ones((2, 9)), [[3, 0]], grid=3)
    with pytest.raises(ValueError, match="maps: the last axis"):
        paper.authors_metrics(np.ones((2, 10)), [[0, 0]], grid=3)
    with pytest.raises(ValueError, match="one cell list per sample"):
        paper.authors_metrics(np.ones((2, 2, 9)), [[[0, 0]]], grid=3)


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("pred, answer, ok", [
    ("Yes", "yes", True),
    ("YES", "yes", True),          # capitalize() lower-cases the rest
    ("yes.", "Yes", True),         # the answer inside the response
    ("", "no", True),              # an empty response counts as correct
    (" yes", "Yes", False),        # not stripped: " yes" vs "Yes"
    ("Not sure", "no", True),      # "No" inside "Not sure"
    ("left", "Left kidney", True),  # the response inside the answer
    ("right", "left", False),
])
def test_score_closed(pred, answer, ok):
    assert paper.score_closed(pred, answer) is ok


OPTS = {"A": "Liver", "B": "Lung", "C": "Heart"}


@pytest.mark.parametrize("pred, want", [
    ("B", "B"),
    ("The answer is (c).", "c"),     # regex, either case, returned as written
    ("答案是B", "B"),                 # after 是
    ("a lung", "B"),                 # the article "a " is not a letter; then the option text
    ("A liver", "A"),
    ("heart and lung", "B"),         # the option text found furthest right
    ("lung, then the heart", "C"),
    ("E", "E"),                      # a letter outside the options is still the letter
    ("I think so", "I"),             # the authors' regex takes a standalone "I"
    ("Livr", "A"),                   # no letter, no text: highest difflib ratio
])
def test_score_choice(pred, want):
    assert paper.score_choice(pred, OPTS) == want


def test_score_choice_ties_and_lists():
    # no letter, no option text: ratios tie at 0 -> the later option wins (>=)
    assert difflib.SequenceMatcher(None, "x", "zzz").ratio() == 0.0
    assert paper.score_choice("zzz", ["x", "x"]) == "B"
    # two options found at the same position: the earlier option
    assert paper.score_choice("lung", {"A": "lung", "B": "lung"}) == "A"
    assert paper.score_choice("whatever", []) is None
