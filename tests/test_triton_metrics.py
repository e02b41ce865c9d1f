"""The Triton grounding-metrics reduction against a float64 golden model and the reference.

The golden below walks each row in plain Python-level float64 tensor code from SPEC §3's
formulas, including its conventions: KL over M̂ > 0 only, zero-weight JS terms are 0,
``max(Â, eps)`` inside KL's log, and NaN for rows with Σm = 0 or Σa = 0.
"""
import math

import pytest
import torch
import triton

import vgkernels
from vgkernels.reference import grounding_metrics_ref
from vgkernels.triton import _common
from vgkernels.triton import metrics as met

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def golden_row(a, m, eps):
    """One row, float64 1-D tensors; returns (ar, kl, js) as Python floats."""
    sa, sm = float(a.sum()), float(m.sum())
    if sa == 0 or sm == 0 or math.isnan(sa) or math.isnan(sm):
        return math.nan, math.nan, math.nan
    N = a.numel()
    ah, mh = a / sa, m / sm
    ar = (float((a * m).sum()) / sm) / (sa / N)
    kl = js = 0.0
    for x, y in zip(ah.tolist(), mh.tolist()):
        if y > 0:
            kl += y * (math.log(y) - math.log(max(x, eps)))
        r = 0.5 * (x + y)
        if x > 0:
            js += 0.5 * x * math.log(x / r)
        if y > 0:
            js += 0.5 * y * math.log(y / r)
    return ar, kl, js


def golden(attn, mask, reference=None, eps=1e-12):
    a = attn.double().cpu()
    if reference is not None:
        a = a / reference.double().cpu()
    m = mask.double().cpu()
    a, m = torch.broadcast_tensors(a, m)
    shape = a.shape[:-1]
    rows = [golden_row(x, y, eps) for x, y in zip(a.reshape(-1, a.shape[-1]), m.reshape(-1, a.shape[-1]))]
    t = torch.tensor(rows, dtype=torch.float64).reshape(*shape, 3) if rows else torch.zeros(*shape, 3)
    return t[..., 0], t[..., 1], t[..., 2]


def assert_metrics(got, want, rtol=1e-4, atol=1e-5):
    for name, g, w in zip(("ar", "kl", "js"), got, want):
        assert g.dtype == torch.float32, name
        assert g.shape == w.shape, name
        gc = g.double().cpu()
        assert torch.equal(torch.isnan(gc), torch.isnan(w)), f"{name}: NaN rows differ"
        ok = ~torch.isnan(w)
        torch.testing.assert_close(gc[ok], w[ok], rtol=rtol, atol=atol, msg=lambda s: f"{name}: {s}")


def peaky(gen, shape):
    """Attention-like rows: a few large entries, many tiny ones, some exact zeros."""
    x = torch.rand(shape, generator=gen) ** 6
    x[torch.rand(shape, generator=gen) < 0.05] = 0.0
    return x


@pytest.mark.parametrize("N", [1, 7, 97, 576, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_match_golden(gen, N, dtype):
    attn = peaky(gen, (3, 5, N)).to(DEV, dtype)
    mask = (torch.rand(3, 5, N, generator=gen) < 0.3).to(DEV)
    mask[0, 0] = False  # Σm = 0 -> NaN
    attn[1, 1] = 0  # Σa = 0 -> NaN
    if N > 1:
        mask[2, 2] = True  # mask everywhere
        mask[2, 3] = False
        mask[2, 3, 0] = True  # a single cell
    got = met.grounding_metrics(attn, mask, None, 1e-12)
    assert_metrics(got, golden(attn, mask))


@pytest.mark.parametrize("N", [1, 7, 577, 4096, 4097, 16384])
def test_single_tile_up_to_4096_columns_then_column_loop(gen, N):
    """The default tiling: one register tile up to 4096 columns, a loop over 2048-column
    tiles beyond (a single tile of 16384 columns spilled ~2 KB per thread on sm_90)."""
    attn = peaky(gen, (2, 3, N)).to(DEV)
    mask = (torch.rand(2, 1, N, generator=gen) < 0.2).to(DEV)
    mask[:, :, N // 2] = True
    ref = (torch.rand(1, 3, N, generator=gen) + 0.05).to(DEV)
    attn[1, 2] = 0  # Σa = 0 -> NaN
    launches = []
    real = met._metrics_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*a, **kw):
                launches.append((kw["SINGLE"], kw["BLOCK_N"]))
                return real[grid](*a, **kw)
            return run

    met._metrics_kernel = Spy()
    try:
        got = met.grounding_metrics(attn, mask, ref, 1e-12)
    finally:
        met._metrics_kernel = real
    assert launches == [(N <= 4096, max(16, triton.next_power_of_2(N)) if N <= 4096 else 2048)]
    assert_metrics(got, golden(attn, mask, ref))


@pytest.mark.parametrize("block_n", [16, 64])
def test_two_sweep_path_for_rows_longer_than_a_tile(gen, block_n):
    attn = peaky(gen, (4, 6, 301)).to(DEV)
    mask = (torch.rand(4, 1, 301, generator=gen) < 0.2).to(DEV)
    ref = (torch.rand(1, 6, 301, generator=gen) + 0.05).to(DEV)
    got = met.grounding_metrics(attn, mask, ref, 1e-12, block_n=block_n)
    assert_metrics(got, golden(attn, mask, ref))


@pytest.mark.parametrize(
    "attn_shape,mask_shape,ref_shape",
    [
        ((2, 3, 4, 50), (50,), None),  # one mask for every row
        ((2, 3, 4, 50), (2, 1, 1, 50), (2, 3, 1, 50)),  # per-sample mask, per-layer reference
        ((2, 3, 4, 50), (1, 3, 4, 50), (50,)),
        ((2, 3, 2, 3, 2, 21), (2, 1, 2, 1, 2, 21), (1, 3, 1, 3, 1, 21)),  # 5 unmergeable row axes: copied
    ],
)
def test_broadcast_mask_and_reference(gen, attn_shape, mask_shape, ref_shape):
    attn = peaky(gen, attn_shape).to(DEV)
    mask = (torch.rand(mask_shape, generator=gen) < 0.4).to(DEV)
    ref = None if ref_shape is None else (torch.rand(ref_shape, generator=gen) + 0.1).to(DEV)
    got = vgkernels.grounding_metrics(attn, mask, reference=ref, backend="triton")
    assert_metrics(got, golden(attn, mask, ref))


def test_non_contiguous_attn_and_numeric_masks(gen):
    base = peaky(gen, (6, 40, 5)).to(DEV)
    attn = base.transpose(1, 2)  # (6, 5, 40), last axis strided
    assert attn.stride(-1) != 1
    for mask in ((torch.rand(6, 5, 40, generator=gen) < 0.3).int(),
                 (torch.rand(1, 5, 40, generator=gen) < 0.3).float()):
        mask = mask.to(DEV)
        assert_metrics(met.grounding_metrics(attn, mask, None, 1e-12), golden(attn, mask))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_attn_dtypes(gen, dtype):
    attn = peaky(gen, (4, 33)).to(DEV, dtype)
    mask = (torch.rand(4, 33, generator=gen) < 0.5).to(DEV)
    mask[:, 0] = True
    assert_metrics(met.grounding_metrics(attn, mask, None, 1e-12), golden(attn, mask))


def test_eps_clamp_and_bounds(gen):
    # Zero attention on masked cells: KL's log uses eps; JS stays within [0, ln 2].
    N = 64
    attn = torch.rand(8, N, generator=gen).to(DEV)
    mask = torch.zeros(8, N, dtype=torch.bool, device=DEV)
    mask[:, :10] = True
    attn[:4, :10] = 0  # disjoint supports: JS = ln 2 exactly, KL dominated by -log eps
    for eps in (1e-12, 1e-6):
        got = met.grounding_metrics(attn, mask, None, eps)
        assert_metrics(got, golden(attn, mask, eps=eps))
        assert torch.all(got.js >= -1e-6) and torch.all(got.js <= math.log(2) + 1e-6)
        torch.testing.assert_close(got.js[:4].cpu(), torch.full((4,), math.log(2)), rtol=1e-6, atol=1e-6)
    uniform = met.grounding_metrics(torch.ones(3, N, device=DEV), mask[:3], None, 1e-12)
    torch.testing.assert_close(uniform.ar.cpu(), torch.ones(3), rtol=1e-6, atol=1e-6)  # uniform attention: AR = 1


def test_matches_reference_module(gen):
    attn = peaky(gen, (2, 4, 3, 576)).to(DEV)
    mask = (torch.rand(2, 1, 1, 576, generator=gen) < 0.1).to(DEV)
    ref = (torch.rand(2, 4, 1, 576, generator=gen) + 0.01).to(DEV)
    got = vgkernels.grounding_metrics(attn, mask, reference=ref, backend="triton")
    want = grounding_metrics_ref(attn, mask, ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("with_ref", [False, True])
def test_head_mean(gen, with_ref):
    B, L, H, N = 2, 3, 5, 90
    attn = peaky(gen, (B, L, H, N)).to(DEV)
    mask = (torch.rand(B, 1, 1, N, generator=gen) < 0.3).to(DEV)  # written against (B, L, H, N)
    mask[1] = False  # sample 1: empty box -> NaN
    ref = (torch.rand(B, L, N, generator=gen) + 0.1).to(DEV) if with_ref else None
    got = met.grounding_metrics(attn, mask, ref, 1e-12, head_mean=True)
    assert got.ar.shape == (B, L)
    assert_metrics(got, golden(attn.double().mean(-2), mask[:, :, 0], ref))
    # and the same on the two-sweep path
    assert_metrics(met.grounding_metrics(attn, mask, ref, 1e-12, head_mean=True, block_n=32),
                   golden(attn.double().mean(-2), mask[:, :, 0], ref))


def test_head_mean_rejects_a_per_head_mask(gen):
    attn = torch.rand(2, 4, 10, device=DEV)
    with pytest.raises(ValueError, match="head-mean"):
        met.grounding_metrics(attn, torch.ones(2, 4, 10, dtype=torch.bool, device=DEV), None, 1e-12, head_mean=True)


def test_public_api_reaches_the_kernel(gen, monkeypatch):
    import vgkernels.triton as vt

    calls = []
    real = vt.grounding_metrics
    monkeypatch.setattr(vt, "grounding_metrics", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    attn = peaky(gen, (3, 20)).to(DEV)
    mask = (torch.rand(3, 20, generator=gen) < 0.5).to(DEV)
    mask[:, 0] = True
    backends = ["triton"] + (["auto"] if (DEV == "cuda" or _common.INTERPRET) else [])
    for backend in backends:
        assert_metrics(vgkernels.grounding_metrics(attn, mask, backend=backend), golden(attn, mask))
    assert len(calls) == len(backends)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [576, 2880, 16384])
def test_gpu_large(gen, N):
    rows = 16 * 28 * 28 if N == 576 else 512
    attn = torch.softmax(torch.randn(rows, N, generator=gen) * 3, -1).to(DEV)
    mask = (torch.rand(16, 1, N, generator=gen) < 0.1).to(DEV)
    attn = attn.reshape(16, -1, N)
    got = vgkernels.grounding_metrics(attn, mask, backend="triton")
    want = grounding_metrics_ref(attn, mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=1e-5, equal_nan=True)
