"""grounding_metrics (torch backend): known cases, NumPy agreement, shapes."""
import math

import numpy as np
import pytest
import torch

import vgkernels as vg
from golden import np_metrics


def test_uniform_attention_gives_ar_one(gen):
    N = 576
    mask = torch.rand(N, generator=gen) > 0.7
    m = vg.grounding_metrics(torch.full((N,), 3.0), mask, backend="torch")
    assert m.ar.item() == pytest.approx(1.0, abs=1e-6)


def test_attention_uniform_on_box_gives_zero_kl_and_js():
    mask = torch.zeros(24 * 24, dtype=torch.bool)
    mask[100:140] = True
    attn = mask.float() * 0.25
    m = vg.grounding_metrics(attn, mask, backend="torch")
    assert m.kl.item() == pytest.approx(0.0, abs=1e-7)
    assert m.js.item() == pytest.approx(0.0, abs=1e-7)
    assert m.ar.item() == pytest.approx(576 / 40, rel=1e-6)


def test_disjoint_supports_give_js_ln2():
    attn = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0])
    mask = torch.tensor([0, 0, 1, 1, 0])
    m = vg.grounding_metrics(attn, mask, backend="torch")
    assert m.js.item() == pytest.approx(math.log(2), rel=1e-6)
    assert m.ar.item() == 0.0
    # Â = 0 on the box: KL is bounded by the eps floor instead of being infinite.
    assert m.kl.item() == pytest.approx(math.log(0.5) - math.log(1e-12), rel=1e-6)


def test_empty_mask_or_zero_attention_gives_nan_without_raising():
    m = vg.grounding_metrics(torch.rand(2, 10), torch.zeros(10, dtype=torch.bool), backend="torch")
    assert torch.isnan(m.ar).all() and torch.isnan(m.kl).all() and torch.isnan(m.js).all()
    attn = torch.rand(3, 10)
    attn[1] = 0
    m = vg.grounding_metrics(attn, torch.ones(10, dtype=torch.bool), backend="torch")
    assert torch.isnan(m.ar[1]) and torch.isnan(m.kl[1]) and torch.isnan(m.js[1])
    assert torch.isfinite(m.ar[[0, 2]]).all()


@pytest.mark.parametrize("shape", [(7,), (3, 97), (2, 4, 5, 576)])
@pytest.mark.parametrize("with_reference", [False, True])
def test_matches_numpy(gen, shape, with_reference):
    attn = torch.rand(*shape, generator=gen) ** 3  # peaky, like attention
    attn[..., :: max(2, shape[-1] // 5)] = 0.0    # exact zeros exercise the 0·log 0 convention
    mask = torch.rand(shape[-1], generator=gen) > 0.6
    mask[0] = True
    ref = torch.rand(*shape[:-1], shape[-1], generator=gen) + 0.1 if with_reference else None
    m = vg.grounding_metrics(attn, mask, reference=ref, backend="torch")
    ar, kl, js = np_metrics(attn.numpy(), mask.numpy(), None if ref is None else ref.numpy())
    for got, want in zip(m, (ar, kl, js)):
        assert got.dtype == torch.float32 and got.shape == attn.shape[:-1]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert (m.js >= 0).all() and (m.js <= math.log(2) + 1e-6).all()


def test_broadcast_mask_and_01_masks(gen):
    attn = torch.rand(4, 3, 12, generator=gen)
    mask = (torch.rand(4, 1, 12, generator=gen) > 0.5)
    mask[..., 0] = True
    a = vg.grounding_metrics(attn, mask, backend="torch")
    b = vg.grounding_metrics(attn, mask.expand(4, 3, 12).to(torch.int64), backend="torch")
    c = vg.grounding_metrics(attn, mask.float(), backend="torch")
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(x, z)


def test_reference_division_is_applied(gen):
    attn = torch.rand(5, 20, generator=gen)
    ref = torch.rand(5, 20, generator=gen) + 0.5
    mask = torch.zeros(20, dtype=torch.bool)
    mask[3:9] = True
    got = vg.grounding_metrics(attn, mask, reference=ref, backend="torch")
    want = vg.grounding_metrics(attn / ref, mask, backend="torch")
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    # A reference equal to attn makes the normalised map uniform: AR = 1.
    torch.testing.assert_close(vg.grounding_metrics(attn, mask, reference=attn, backend="torch").ar,
                               torch.ones(5), atol=1e-6, rtol=1e-6)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1e3, allow_subnormal=False), min_size=1, max_size=40), st.data())
def test_properties_hold_for_any_row(values, data):
    """KL >= 0, 0 <= JS <= ln 2, AR >= 0, and agreement with NumPy on arbitrary rows."""
    attn = torch.tensor(values, dtype=torch.float64)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values))))
    m = vg.grounding_metrics(attn, mask, backend="torch")
    ar, kl, js = np_metrics(attn.numpy(), mask.numpy())
    if attn.sum() == 0 or not mask.any():
        assert torch.isnan(m.ar) and torch.isnan(m.kl) and torch.isnan(m.js)
        return
    assert m.kl >= -1e-6 and -1e-7 <= m.js <= math.log(2) + 1e-6 and m.ar >= 0
    np.testing.assert_allclose([m.ar.item(), m.kl.item(), m.js.item()], [ar, kl, js], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_marks_tokens_a_row_does_not_have(backend, gen):
    """vg.maps pads a batch of different image sizes with NaN: a padded row's metrics equal
    those of the row cut to its own N (AR's N included)."""
    B, N = 4, 37
    attn = torch.rand(B, 3, N, generator=gen)
    ref = torch.rand(B, 3, N, generator=gen) + 0.1
    mask = torch.rand(B, 1, N, generator=gen) > 0.6
    ns = [37, 20, 5, 31]
    padded, pref, pmask = attn.clone(), ref.clone(), mask.clone()
    for b, n in enumerate(ns):
        padded[b, :, n:] = float("nan")
        pref[b, :, n:] = float("nan")
        pmask[b, :, n:] = False
    got = vg.grounding_metrics(padded, pmask, reference=pref, backend=backend)
    for b, n in enumerate(ns):
        want = vg.grounding_metrics(attn[b, :, :n], mask[b, :, :n], reference=ref[b, :, :n], backend="torch")
        for g, w in zip(got, want):
            torch.testing.assert_close(g[b], w, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_bad_attention_values_raise():
    a = torch.tensor([[0.2, 0.3, 0.5]])
    m = torch.tensor([[True, False, False]])
    with pytest.raises(ValueError, match="attn: expected probabilities >= 0, got negative"):
        vg.grounding_metrics(-a, m, backend="torch")  # today -P gave the same AR/KL as P
    with pytest.raises(ValueError, match="attn: expected finite values, got inf"):
        vg.grounding_metrics(torch.tensor([[0.2, float("inf"), 0.5]]), m, backend="torch")
    with pytest.raises(ValueError, match="attn: NaN on a ground-truth token"):
        vg.grounding_metrics(torch.tensor([[float("nan"), 0.3, 0.5]]), m, backend="torch")
    with pytest.raises(ValueError, match="reference: expected finite values > 0"):
        vg.grounding_metrics(a, m, reference=torch.tensor([[1.0, 0.0, 1.0]]), backend="torch")
    with pytest.raises(ValueError, match="reference: expected finite values > 0"):
        vg.grounding_metrics(a, m, reference=torch.tensor([[1.0, float("inf"), 1.0]]), backend="torch")
    # a reference NaN where attn is NaN too (both padded) is fine
    r = vg.grounding_metrics(torch.tensor([[0.2, 0.8, float("nan")]]), m,
                             reference=torch.tensor([[1.0, 2.0, float("nan")]]), backend="torch")
    assert bool(torch.isfinite(r.ar).all())
