"""triage_mask against numpy.percentile; presets and heads.json."""
import json

import numpy as np
import pytest
import torch

import vgkernels as vg
from vgkernels.presets import HEADS, resolve_heads


def numpy_triage(maps, heads, reference=None, percentile=50.0):
    maps = maps.double().numpy()
    out = []
    for b in range(maps.shape[0]):
        rows = []
        for l, h in heads:
            r = maps[b, l, h]
            if reference is not None:
                ref = reference.double().numpy()
                r = r / (ref[b, l].mean(0) if ref.ndim == 4 else ref[b, l])
            rows.append(r)
        agg = np.mean(rows, axis=0)
        out.append(agg >= np.percentile(agg, percentile))
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("percentile", [0.0, 30.0, 50.0, 62.5, 90.0, 100.0])
@pytest.mark.parametrize("ref_kind", [None, "head_mean", "per_head"])
def test_matches_numpy_percentile(gen, percentile, ref_kind):
    B, L, H, N = 3, 5, 6, 577
    maps = torch.rand(B, L, H, N, generator=gen)
    heads = [(int(torch.randint(0, L, (1,), generator=gen)), int(torch.randint(0, H, (1,), generator=gen)))
             for _ in range(4)]
    ref = None
    if ref_kind == "head_mean":
        ref = torch.rand(B, L, N, generator=gen) + 0.1
    elif ref_kind == "per_head":
        ref = torch.rand(B, L, H, N, generator=gen) + 0.1
    keep = vg.triage_mask(maps, heads, reference=ref, percentile=percentile)
    assert keep.dtype == torch.bool and keep.shape == (B, N)
    assert torch.equal(keep, numpy_triage(maps, heads, ref, percentile))


def test_ties_and_constant_maps(gen):
    B, L, H, N = 2, 2, 2, 40
    maps = torch.randint(0, 3, (B, L, H, N), generator=gen).float()  # heavy ties
    for p in (10.0, 50.0, 75.0):
        keep = vg.triage_mask(maps, [(0, 0), (1, 1)], percentile=p)
        assert torch.equal(keep, numpy_triage(maps, [(0, 0), (1, 1)], None, p))
    const = torch.full((1, 1, 1, 9), 0.2)
    assert vg.triage_mask(const, [(0, 0)]).all()  # every token equals the threshold: all kept


def test_tokens_strictly_below_are_dropped():
    maps = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).reshape(1, 1, 1, 5)
    keep = vg.triage_mask(maps, [(0, 0)], percentile=50.0)
    assert keep.tolist() == [[False, False, True, True, True]]


def test_nan_padded_maps_threshold_per_sample(gen):
    maps = torch.rand(2, 1, 2, 10, generator=gen)
    maps[1, ..., 6:] = float("nan")  # sample 1 has N=6
    keep = vg.triage_mask(maps, [(0, 0), (0, 1)], percentile=50.0)
    assert torch.equal(keep[1, :6], numpy_triage(maps[1:, ..., :6], [(0, 0), (0, 1)])[0])
    assert torch.equal(keep[0], numpy_triage(maps[:1], [(0, 0), (0, 1)])[0])


def test_presets_and_heads_json(tmp_path):
    heads = HEADS["huatuogpt-vision-7b"]
    assert len(heads) == 20 and heads[0] == (15, 4) and heads[-1] == (17, 26)
    assert resolve_heads("huatuogpt-vision-7b") == heads
    p = tmp_path / "heads.json"
    p.write_text(json.dumps({"heads": [{"layer": 1, "head": 2}, {"layer": 0, "head": 3}]}))
    assert resolve_heads(str(p)) == [(1, 2), (0, 3)]
    p.write_text(json.dumps([[2, 1]]))
    assert resolve_heads(p) == [(2, 1)]
    maps = torch.rand(1, 32, 28, 16)
    assert vg.triage_mask(maps, "huatuogpt-vision-7b").shape == (1, 16)


def test_bad_heads_and_percentile():
    maps = torch.rand(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"heads: pairs \[\(2, 0\)\] lie outside maps of 2 layers x 3 heads"):
        vg.triage_mask(maps, [(2, 0)])
    with pytest.raises(ValueError, match="percentile"):
        vg.triage_mask(maps, [(0, 0)], percentile=101)
    with pytest.raises(ValueError, match="neither a preset"):
        vg.triage_mask(maps, "no-such-model")
    with pytest.raises(ValueError, match=r"maps: expected shape \(B, L, H, N\)"):
        vg.triage_mask(torch.rand(2, 3, 4), [(0, 0)])
    with pytest.raises(ValueError, match="reference: expected shape"):
        vg.triage_mask(maps, [(0, 0)], reference=torch.rand(1, 2, 5))
