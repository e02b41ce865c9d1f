"""Grid layouts, box masks, gt_tokens masks and the authors' question files."""
import json
import os

import pytest
import torch

import vgkernels as vg
from vgkernels.data import RowError, iter_questions, read_questions

# The project's shared/ folder sits beside the repository (CI clones main next to it).
OFFICIAL = os.environ.get("VGKERNELS_OFFICIAL_DATA") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "official")
OFFICIAL_NAMES = ["COCO_attribute_questions.jsonl", "COCO_localization_questions.jsonl",
                  "VGMED_attribute_questions.jsonl", "VGMED_localization_questions.jsonl"]
OFFICIAL_FILES = [os.path.join(OFFICIAL, n) for n in OFFICIAL_NAMES]


def test_grid_layout_is_row_major():
    lay = vg.grid_layout((2, 3), (300, 200), key_start=7)
    assert lay.N == 6 and lay.key_start == 7 and lay.grid == (2, 3)
    # token t = y * W + x covers [100x, 100x + 100) x [100y, 100y + 100)
    for t in range(6):
        y, x = divmod(t, 3)
        assert lay.cells[t].tolist() == [100.0 * x, 100.0 * y, 100.0 * (x + 1), 100.0 * (y + 1)]


def test_box_mask_any_overlap():
    lay = vg.grid_layout((4, 4), (400, 400))
    m = vg.box_mask(lay, [[150, 50, 10, 10]])            # inside cell (x=1, y=0)
    assert m.nonzero().flatten().tolist() == [1]
    m = vg.box_mask(lay, [[100, 100, 100, 100]])          # exactly cell (1, 1): borders only touch
    assert m.nonzero().flatten().tolist() == [5]
    m = vg.box_mask(lay, [[99, 99, 2, 2]])                # a 2-px box on a corner touches 4 cells
    assert m.nonzero().flatten().tolist() == [0, 1, 4, 5]
    m = vg.box_mask(lay, [[0, 0, 10, 10], [390, 390, 10, 10]])  # two boxes: union
    assert m.nonzero().flatten().tolist() == [0, 15]
    assert not vg.box_mask(lay, []).any()


def test_box_mask_batch_and_nan_cells():
    a = vg.grid_layout((2, 2), (20, 20))
    cells = torch.cat([vg.grid_layout((1, 2), (20, 10)).cells, torch.full((1, 4), float("nan"))])
    b = vg.ImageLayout(key_start=3, N=3, grid=(1, 2), cells=cells)   # a newline token has no place
    m = vg.box_mask([a, b], [[[0, 0, 20, 20]], [[0, 0, 20, 10]]])
    assert m.shape == (2, 4)
    assert m[0].tolist() == [True] * 4
    assert m[1].tolist() == [True, True, False, False]


def test_box_mask_rejects_bad_boxes():
    lay = vg.grid_layout((2, 2), (20, 20))
    with pytest.raises(ValueError, match=r"boxes: expected \[x, y, w, h\]"):
        vg.box_mask(lay, [[1, 2, 3]])
    with pytest.raises(ValueError, match="widths and heights must be >= 0"):
        vg.box_mask(lay, [[1, 2, -3, 4]])
    with pytest.raises(ValueError, match="one box list per layout"):
        vg.box_mask([lay, lay], [[[0, 0, 1, 1]]])


def test_gt_tokens_mask_cell_convention():
    m = vg.gt_tokens_mask([[3, 1], [0, 23]])
    assert m.shape == (576,)
    assert m.nonzero().flatten().tolist() == [1 * 24 + 3, 23 * 24 + 0]
    with pytest.raises(ValueError, match=r"cell \[x=24, y=0\] lies outside the 24x24 grid"):
        vg.gt_tokens_mask([[24, 0]])


@pytest.mark.parametrize("path", OFFICIAL_FILES, ids=os.path.basename)
def test_official_files_parse(path):
    rows = read_questions(path)
    assert len(rows) == 1388
    for r in rows:
        assert r.bbox and all(len(b) == 4 and b[2] >= 0 and b[3] >= 0 for b in r.bbox)
        m = r.gt_mask()
        assert m.shape == (576,) and m.any()
        # cell [x, y] is token y * 24 + x
        x, y = r.gt_tokens[0]
        assert m[y * 24 + x]
        assert int(m.sum()) == len({(int(a), int(b)) for a, b in r.gt_tokens})
    if "VGMED" in path:
        assert all("modality" in r.extra and "location" in r.extra for r in rows)


def test_malformed_rows_raise_or_yield(tmp_path):
    p = tmp_path / "q.jsonl"
    good = {"image": "a", "question": "Where?", "bbox": [[1, 2, 3, 4]], "gt_tokens": [[0, 0]], "modality": "CT"}
    lines = [json.dumps(good), "{not json", json.dumps({**good, "bbox": [[1, 2, 3]]}),
             json.dumps({**good, "gt_tokens": [[30, 1]]}), json.dumps({"question": "q", "bbox": [[0, 0, 1, 1]]}), ""]
    p.write_text("\n".join(lines))
    items = list(iter_questions(str(p), errors="yield"))
    assert len(items) == 5
    assert items[0].extra == {"modality": "CT"}
    errs = items[1:]
    assert all(isinstance(e, RowError) for e in errs)
    assert [e.line for e in errs] == [2, 3, 4, 5]
    assert "not valid JSON" in errs[0].reason
    assert "bbox: expected [x, y, w, h]" in errs[1].reason
    assert "outside the 24x24 grid" in errs[2].reason
    assert "missing field 'image'" in errs[3].reason
    with pytest.raises(RowError, match=r"q.jsonl:2: not valid JSON"):
        read_questions(str(p))
