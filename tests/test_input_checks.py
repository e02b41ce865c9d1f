"""Values that used to be accepted silently now raise errors that say what is wrong."""
import math

import pytest
import torch

import vgkernels as vg
from vgkernels.integrations.loaders import load_model, parse_tiny
from vgkernels.integrations.tiny import build_tiny


@pytest.mark.parametrize("box,msg", [
    ([float("nan"), 0, 10, 10], "finite"),
    ([0, 0, math.inf, 10], "finite"),
    ([0, 0, -1, 10], ">= 0"),
    ([60, 0, 10, 10], "lie entirely outside the image of 56x56"),
    ([0, 56, 10, 10], "lie entirely outside the image"),
    ([-20, -20, 10, 10], "lie entirely outside the image"),
    ("box", "expected"),
])
def test_box_mask_refuses_nan_and_out_of_image_boxes(box, msg):
    lay = vg.grid_layout((4, 4), (56, 56))
    with pytest.raises(ValueError, match=msg):
        vg.box_mask(lay, [box])


def test_box_mask_keeps_boxes_that_stick_out_and_reports_what_the_model_sees():
    lay = vg.grid_layout((4, 4), (56, 56))
    m = vg.box_mask(lay, [[50, 50, 30, 30]])  # sticks out at the bottom right: the part inside counts
    assert m.tolist() == [False] * 15 + [True]
    # a layout that does not know the image size cannot tell: no error
    anon = vg.ImageLayout(0, 16, (4, 4), lay.cells, None)
    assert not vg.box_mask(anon, [[60, 0, 10, 10]]).any()
    # a centre crop: the tokens cover the middle of a wide image only
    from vgkernels.layout import grid_cells, visible_region

    crop = vg.ImageLayout(0, 4, (2, 2), grid_cells((2, 2), (28, 0, 84, 56)), (112, 56))
    assert visible_region(crop) == (28.0, 0.0, 84.0, 56.0)
    assert not vg.box_mask(crop, [[2, 10, 20, 20]]).any()  # inside the image, outside the crop: empty


@pytest.mark.parametrize("heads", [(0, 1), [0, 1], torch.tensor([0, 1])])
def test_triage_mask_refuses_a_bare_pair(heads):
    maps = torch.rand(1, 3, 4, 9)
    with pytest.raises(ValueError, match=r"bare pair \(0, 1\); expected a list of \(layer, head\) pairs, "
                                         r"e.g. \[\(0, 1\)\]"):
        vg.triage_mask(maps, heads)
    assert vg.triage_mask(maps, [(0, 1)]).shape == (1, 9)
    with pytest.raises(ValueError, match="expected \\(layer, head\\) pairs"):
        vg.triage_mask(maps, [(0, 1), 2])


def test_unknown_size_keyword_in_a_tiny_model_name():
    with pytest.raises(ValueError, match="unknown size keyword 'num_layer' in 'tiny-llava:num_layer=3' "
                                         "\\(did you mean 'num_layers'\\?\\)"):
        parse_tiny("tiny-llava:num_layer=3")
    with pytest.raises(ValueError, match="unknown size keyword"):
        load_model("tiny-qwen2-vl:heads=2")
    assert parse_tiny("tiny-llava:num_layers=3,image_size=112") == ("tiny-llava", {"num_layers": 3,
                                                                                   "image_size": 112})
    assert load_model("tiny-llava:num_layers=3").n_layers_heads() == (3, 4)
    # the Python builder: size keywords, the builder's own, and real config fields only
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['num_layer'\] for tiny-llava"):
        build_tiny("tiny-llava", num_layer=3)
    with pytest.raises(ValueError, match="unknown keyword"):
        build_tiny("tiny-qwen2-vl", hidden=32)
    build_tiny("tiny-llava-next", image_grid_pinpoints=[[28, 28]])
