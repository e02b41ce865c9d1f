"""vg.layout cells are in original-image pixels, for every family's processor transform.

The check does not re-derive the geometry: it feeds the real processor an image whose
colour encodes position (R = 255·x/w, G = 255·y/h), and compares, for every token, the
mean colour of the processed pixels that token covers with the colour at the centre of
its cell in the original image. A linear ramp's mean over a square is its value at the
centre, so only resampling error remains (a few units); an off-by-one cell is tens of
units away. Cells over ``expand2square`` padding must show the padding colour.
"""
from __future__ import annotations

import pytest
import torch

import vgkernels
from vgkernels import patch_model
from vgkernels.integrations.tiny import CLIP_MEAN, CLIP_STD

from tiny_models import gradient_image, logits_of, models

MEAN = torch.tensor(CLIP_MEAN)[:, None, None]
STD = torch.tensor(CLIP_STD)[:, None, None]
TOL = 8.0  # colour units out of 255


def _unnorm(x):  # (..., 3, h, w) normalised -> 0..255
    return (x * STD + MEAN) * 255


def _run(name, size, text="Where?"):
    model, proc, _ = models(name)
    img = gradient_image(*size)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    if name.startswith("tiny-splice"):
        inp = proc(images=[img], text=[prompt])
    else:
        inp = proc(images=img, text=prompt, return_tensors="pt")
    with patch_model(model, capture=[0], image_sizes=[size], backend="torch") as vg:
        logits_of(model, inp)
    return model, inp, vg.layout[0]


def _predicted(cells, size):
    w, h = size
    cx = (cells[:, 0] + cells[:, 2]) / 2
    cy = (cells[:, 1] + cells[:, 3]) / 2
    return torch.stack([255 * cx / w, 255 * cy / h], dim=1)


def _inside(cells, size):
    w, h = size
    return (cells[:, 0] >= 0) & (cells[:, 1] >= 0) & (cells[:, 2] <= w) & (cells[:, 3] <= h)


def _compare(measured, cells, size, label):
    ok = _inside(cells, size)
    assert bool(ok.any()), label
    pred = _predicted(cells[ok], size)
    err = (measured[ok] - pred).abs().max()
    assert err < TOL, f"{label}: max colour error {float(err):.1f} (cells {cells[ok][:3].tolist()} ...)"


@pytest.mark.parametrize("size", [(80, 60), (60, 90), (56, 56)])
def test_llava_resize_crop(size):
    model, inp, lay = _run("tiny-llava", size)
    px = _unnorm(inp["pixel_values"][0])
    g = lay.grid[0]
    p = px.shape[-1] // g
    measured = px[:2].reshape(2, g, p, g, p).mean(dim=(2, 4)).permute(1, 2, 0).reshape(-1, 2)
    _compare(measured, lay.cells, size, "llava")
    # centre crop: the cells cover the middle of the long side and none of its ends
    w, h = size
    long_lo = lay.cells[:, 0].min() if w > h else lay.cells[:, 1].min()
    assert (float(long_lo) > 0) == (w != h)
    assert lay.image_size == size


@pytest.mark.parametrize("size", [(80, 40), (40, 84), (60, 60)])
def test_llava_next_base_and_tiles(size):
    from transformers.image_processing_utils import select_best_resolution

    model, inp, lay = _run("tiny-llava-next", size)
    w, h = size
    tile = model.config.vision_config.image_size
    patch = model.config.vision_config.patch_size
    g = tile // patch
    pv = _unnorm(inp["pixel_values"][0])  # (tiles, 3, t, t)
    # base: tile 0 squashed over the whole image
    base = pv[0, :2].reshape(2, g, patch, g, patch).mean(dim=(2, 4)).permute(1, 2, 0).reshape(-1, 2)
    _compare(base, lay.cells[: g * g], size, "llava-next base")
    # tiles: rebuild the padded canvas and cut the kept feature rows/cols
    bh, bw = select_best_resolution((h, w), model.config.image_grid_pinpoints)
    nph, npw = bh // tile, bw // tile
    canvas = pv[1: 1 + nph * npw, :2].reshape(nph, npw, 2, tile, tile).permute(2, 0, 3, 1, 4).reshape(2, bh, bw)
    Hf, Wf = nph * g, npw * g
    feat = canvas.reshape(2, Hf, patch, Wf, patch).mean(dim=(2, 4))  # (2, Hf, Wf)
    rows, cols = lay.extra["tiles_grid"]
    r0, c0 = (Hf - rows) // 2, (Wf - cols) // 2
    kept = feat[:, r0: r0 + rows, c0: c0 + cols].permute(1, 2, 0)  # (rows, cols, 2)
    tiles = lay.cells[g * g:].reshape(rows, cols + 1, 4)
    assert bool(torch.isnan(tiles[:, -1]).all()), "the newline column has no place"
    _compare(kept.reshape(-1, 2), tiles[:, :-1].reshape(-1, 4), size, "llava-next tiles")
    assert lay.N == g * g + rows * (cols + 1)


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
@pytest.mark.parametrize("size", [(80, 60), (45, 110), (112, 112)])
def test_qwen_smart_resize(name, size):
    model, inp, lay = _run(name, size)
    vc = model.config.vision_config
    P, m = vc.patch_size, vc.spatial_merge_size
    t, hh, ww = inp["image_grid_thw"][0].tolist()
    pv = inp["pixel_values"].reshape(t, hh // m, ww // m, m, m, 3, vc.temporal_patch_size, P, P)[0, ..., 0, :, :]
    pv = _unnorm(pv.reshape(-1, 3, P, P)).reshape(hh // m, ww // m, m, m, 3, P, P)
    measured = pv[..., :2, :, :].mean(dim=(2, 3, 5, 6)).reshape(-1, 2)
    assert lay.grid == (hh // m, ww // m)
    _compare(measured, lay.cells, size, name)
    # smart_resize keeps the whole image: the cells tile it exactly
    w, h = size
    assert torch.allclose(lay.cells[:, 0::2].min(), torch.tensor(0.0, dtype=torch.float64))
    assert float(lay.cells[:, 2].max()) == pytest.approx(w) and float(lay.cells[:, 3].max()) == pytest.approx(h)


@pytest.mark.parametrize("name", ["tiny-splice", "tiny-splice-vila"])
@pytest.mark.parametrize("size", [(80, 40), (40, 80)])
def test_splice_expand2square(name, size):
    model, inp, lay = _run(name, size)
    px = _unnorm(inp["images"][0])
    g = lay.grid[0]
    p = px.shape[-1] // g
    measured_all = px.reshape(3, g, p, g, p).mean(dim=(2, 4)).permute(1, 2, 0).reshape(-1, 3)
    _compare(measured_all[:, :2], lay.cells, size, name)
    w, h = size
    outside = (lay.cells[:, 2] <= 0) | (lay.cells[:, 3] <= 0) | (lay.cells[:, 0] >= w) | (lay.cells[:, 1] >= h)
    assert bool(outside.any())
    pad = torch.tensor([int(c * 255) for c in CLIP_MEAN], dtype=torch.float32)
    assert float((measured_all[outside] - pad).abs().max()) < TOL


def test_box_mask_in_original_pixels():
    # LLaVA, an 80x60 image: resized to 74x56, crop x in [9, 65) -> original x in [9.7, 70.3)
    _, _, lay = _run("tiny-llava", (80, 60))
    left_strip = vgkernels.box_mask(lay, [[0, 0, 9, 60]])
    assert not bool(left_strip.any()), "cropped-away pixels have no token"
    m = vgkernels.box_mask(lay, [[40, 30, 1, 1]])  # the image centre
    assert int(m.sum()) >= 1
    ys, xs = torch.nonzero(m.reshape(lay.grid)).unbind(1)
    assert set(ys.tolist()) <= {1, 2} and set(xs.tolist()) <= {1, 2}
    # Qwen: the full image box selects every token
    _, _, lq = _run("tiny-qwen2-vl", (80, 60))
    assert bool(vgkernels.box_mask(lq, [[0, 0, 80, 60]]).all())


def test_vila_maps_are_row_major():
    """VILA-M3's tokens come column-major; vg.maps and the layout are row-major."""
    from tiny_models import column_to_row, eager_rows, expected_spans, make_inputs

    model, proc, ref = models("tiny-splice-vila")
    inp = make_inputs("tiny-splice-vila", proc, ["Where?"], [(80, 60)])
    spans, mask = expected_spans("tiny-splice-vila", model, inp)
    with torch.no_grad():
        att = ref(**inp, output_attentions=True).attentions
    ks, n = spans[0]
    last = int(torch.nonzero(mask[0]).max())
    seq = att[0][0, :, last, ks: ks + n]
    with patch_model(model, capture=[0], backend="torch") as vg:
        logits_of(model, inp)
    perm = vg.layout[0].extra["sequence_order"]
    torch.testing.assert_close(vg.maps[0, 0], seq[:, perm], atol=1e-6, rtol=1e-5)
    # sequence token s sits at (y, x) = (s mod g, s div g)
    g = vg.layout[0].grid[0]
    for t in range(n):
        assert int(perm[t]) == (t % g) * g + t // g
    assert torch.equal(perm, column_to_row(n))


def test_without_image_sizes_cells_are_in_model_input_pixels():
    model, proc, _ = models("tiny-llava")
    from tiny_models import make_inputs

    inp = make_inputs("tiny-llava", proc, ["Where?"], [(80, 60)])
    with patch_model(model, capture=[0], backend="torch") as vg:
        logits_of(model, inp)
        lay = vg.layout[0]
        assert lay.image_size is None
        side = model.config.vision_config.image_size
        assert float(lay.cells.min()) == 0.0 and float(lay.cells.max()) == side
        # setting the sizes for the next batch switches to original pixels
        vg.image_sizes = [(80, 60)]
        logits_of(model, inp)
        assert vg.layout[0].image_size == (80, 60)
        assert float(vg.layout[0].cells[:, 2].max()) < 80 and float(vg.layout[0].cells[:, 0].min()) > 0
