"""The fused Triton attention kernel against a float64 dense golden model and the reference.

On CPU-only machines the kernel runs in Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``), where tiles are 16×16 so that every case crosses several block
edges; tests marked ``gpu`` (bfloat16, long sequences, large batches) run where CUDA is.
Every output buffer starts as NaN (POISON), so an element the kernel does not write fails.

Calls with ``Sq <= 16`` take the split-KV kernels (packed GQA rows, key splits merged by
log-sum-exp); longer query blocks the fused forward. Every tile of the static table runs
here once (forced, small shapes; the TMA variants through the interpreter's tensor
descriptors) and, on a GPU, on every key of that GPU's architecture.
"""
import math

import pytest
import torch
import triton

import vgkernels
from vgkernels._validate import check_attention
from vgkernels import Capture, Knockout
from vgkernels import reference as ref_mod
from vgkernels.triton import _common
from vgkernels.triton import flash, tiles

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (out, lse, probs) absolute tolerances: a few times what the arithmetic of the dtype
# makes (float32 accumulators everywhere; the output is rounded to the input dtype).
TOL = {
    # GPU float32 dots are 3xTF32 (flash.py): a little looser than the interpreter's fp32 numpy.
    torch.float32: (3e-5, 3e-5, 1e-5) if _common.INTERPRET else (1e-4, 1e-4, 3e-5),
    torch.float16: (3e-3, 1e-4, 3e-5) if _common.INTERPRET else (4e-3, 1e-3, 1e-3),
    torch.bfloat16: (2.5e-2, 5e-3, 5e-3),
}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def golden(q, k, v, *, causal=True, scale=None, kpm=None, knockout=None, capture=None):
    """Dense float64 attention, masks built per (row, key) from SPEC §2's sentences.

    Returns ``out (B, Sq, Hq, D)``, ``lse (B, Hq, Sq)``, ``probs (B, Hq, N) | None``, float64.
    """
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    G = Hq // Hkv
    qd = q.double().cpu()
    kd = k.double().cpu().repeat_interleave(G, dim=2)  # query head h reads kv head h // G
    vd = v.double().cpu().repeat_interleave(G, dim=2)
    pos = torch.arange(Sq)[:, None] + (Sk - Sq)  # (Sq, 1) absolute row positions
    key = torch.arange(Sk)[None, :]
    out = torch.zeros(B, Sq, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), -math.inf, dtype=torch.float64)
    probs = None if capture is None else torch.zeros(B, Hq, capture.length, dtype=torch.float64)
    for b in range(B):
        allowed = torch.ones(Sq, Sk, dtype=torch.bool)
        if causal:
            allowed &= key <= pos
        if kpm is not None:
            allowed &= kpm[b].cpu()[None, :]
        knocked = torch.zeros(Sq, Sk, dtype=torch.bool)
        if knockout is not None:
            qs, qe, ks = (int(x[b]) for x in (knockout.query_start, knockout.query_end, knockout.key_start))
            keep = knockout.keep[b].cpu()
            for j in range(keep.numel()):
                if not bool(keep[j]):
                    knocked[:, ks + j] = True
            knocked &= (pos >= qs) & (pos < qe)
        zero_mode = knockout is not None and knockout.mode == "zero"
        in_denominator = allowed if zero_mode else allowed & ~knocked
        in_numerator = allowed & ~knocked
        for h in range(Hq):
            s = qd[b, :, h] @ kd[b, :, h].T * scale
            s_den = s.masked_fill(~in_denominator, -math.inf)
            row_lse = torch.logsumexp(s_den, dim=1)
            p = torch.zeros_like(s)
            has = torch.isfinite(row_lse)
            p[has] = torch.exp(s[has] - row_lse[has, None])
            p = p.masked_fill(~in_numerator, 0.0)
            out[b, :, h] = p @ vd[b, :, h]
            lse[b, h] = row_lse
            if capture is not None:
                r = int(capture.row[b]) - (Sk - Sq)
                c0 = int(capture.key_start[b])
                probs[b, h] = p[r, c0:c0 + capture.length]
    return out, lse, probs


def rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, dtype, layout="contiguous"):
    q = torch.randn(B, Sq, Hq, D, generator=gen)
    k = torch.randn(B, Sk, Hkv, D, generator=gen)
    v = torch.randn(B, Sk, Hkv, D, generator=gen)
    if layout == "strided":
        # q read from a fused qkv-like buffer: non-trivial batch/sequence/head strides.
        big = torch.randn(B, Sq, Hq + 3, D, generator=gen)
        big[:, :, 1:Hq + 1] = q
        q = big[:, :, 1:Hq + 1]
    return tuple(t.to(device=DEV, dtype=dtype) for t in (q, k, v))


def check(res, gold, dtype, *, probs_expected=False):
    out, lse, probs = res
    g_out, g_lse, g_probs = gold
    t_out, t_lse, t_probs = TOL[dtype]
    assert out.dtype == dtype
    assert not torch.isnan(out).any(), "NaN in out: an element was left unwritten or a row divided 0/0"
    torch.testing.assert_close(out.double().cpu(), g_out, atol=t_out, rtol=t_out)
    if lse is not None:
        assert lse.dtype == torch.float32
        assert not torch.isnan(lse).any()
        lc = lse.double().cpu()
        assert torch.equal(torch.isneginf(lc), torch.isneginf(g_lse)), "rows with no key must have lse = -inf"
        fin = torch.isfinite(g_lse)
        torch.testing.assert_close(lc[fin], g_lse[fin], atol=t_lse, rtol=t_lse)
    if probs_expected:
        assert probs is not None and probs.dtype == torch.float32
        assert not torch.isnan(probs).any()
        torch.testing.assert_close(probs.double().cpu(), g_probs, atol=t_probs, rtol=t_probs)
    else:
        assert probs is None


def run_triton(q, k, v, causal=True, scale=None, kpm=None, knockout=None, capture=None, **kw):
    args = check_attention(q, k, v, causal, scale, kpm, knockout, capture)
    return flash.attention(args.q, args.k, args.v, args.causal, args.scale, args.key_padding_mask,
                           args.knockout, args.capture, True, **kw)


SHAPES = [  # (B, Sq, Sk, Hq, Hkv, D)
    (1, 1, 1, 1, 1, 64),
    (2, 1, 97, 4, 1, 64),  # decode row over a cache, GQA 4
    (2, 7, 7, 7, 1, 80),  # GQA 7, odd length, non-power-of-2 head dim
    (1, 97, 97, 4, 4, 128),
    (2, 33, 97, 8, 2, 80),  # Sq < Sk, suffix on top of a cache
    (1, 20, 577, 2, 1, 64),  # a LLaVA-sized key axis
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_plain_attention_matches_golden(gen, shape, causal, dtype):
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, dtype)
    check(run_triton(q, k, v, causal), golden(q, k, v, causal=causal), dtype)


def test_head_dim_96_strided_q_and_custom_scale(gen):
    q, k, v = rand_qkv(gen, 2, 19, 40, 6, 3, 96, torch.float32, layout="strided")
    assert not q.is_contiguous()
    check(run_triton(q, k, v, True, 0.3), golden(q, k, v, scale=0.3), torch.float32)


def test_head_dim_256(gen):
    q, k, v = rand_qkv(gen, 1, 17, 23, 2, 1, 256, torch.float32)
    check(run_triton(q, k, v, True), golden(q, k, v), torch.float32)


@pytest.mark.parametrize("side", ["left", "right", "holes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_key_padding(gen, side, dtype):
    B, Sq, Sk, Hq, Hkv, D = 3, 21, 45, 4, 2, 64
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, dtype)
    kpm = torch.ones(B, Sk, dtype=torch.bool)
    if side == "left":  # left padding: the first query rows may see no real key at all
        kpm[0, :30] = False
        kpm[1, :3] = False
    elif side == "right":
        kpm[0, 40:] = False
        kpm[1, 17:] = False
    else:
        kpm = torch.rand(B, Sk, generator=gen) > 0.5
    kpm[2] = False  # a sample with no real key: every row is empty
    kpm = kpm.to(DEV)
    res = run_triton(q, k, v, True, kpm=kpm)
    gold = golden(q, k, v, kpm=kpm)
    check(res, gold, dtype)
    assert torch.isneginf(res[1][2]).all() and (res[0][2] == 0).all()


def make_knockout(gen, B, Sk, N, mode, keep_kind, key_start, q_band):
    if keep_kind == "all_true":
        keep = torch.ones(B, N, dtype=torch.bool)
    elif keep_kind == "all_false":
        keep = torch.zeros(B, N, dtype=torch.bool)
    else:
        keep = torch.rand(B, N, generator=gen) > 0.5
    qs, qe = q_band
    return Knockout(torch.tensor(qs), torch.tensor(qe), torch.tensor(key_start), keep.to(DEV), mode)


# (key_start per sample, (query_start, query_end) per sample) for Sk = 61, N = 17, Sq = 29
SPANS = {
    "first_keys": ([0, 0], ([32, 40], [61, 50])),
    "last_keys": ([44, 44], ([32, 55], [61, 61])),
    "middle_partial_band": ([20, 9], ([45, 37], [52, 38])),
    "empty_band": ([5, 30], ([40, 0], [40, 0])),
    "band_before_block": ([3, 3], ([0, 0], [33, 61])),  # rows before the query block are untouched
}


@pytest.mark.parametrize("mode", ["renorm", "zero"])
@pytest.mark.parametrize("keep_kind", ["all_true", "all_false", "random"])
@pytest.mark.parametrize("span", list(SPANS))
def test_knockout(gen, mode, keep_kind, span):
    B, Sq, Sk, Hq, Hkv, D, N = 2, 29, 61, 4, 2, 64, 17
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, torch.float32)
    ks, band = SPANS[span]
    ko = make_knockout(gen, B, Sk, N, mode, keep_kind, ks, band)
    check(run_triton(q, k, v, True, knockout=ko), golden(q, k, v, knockout=ko), torch.float32)


@pytest.mark.parametrize("mode", ["renorm", "zero"])
def test_knockout_all_keys_knocked_gives_empty_rows_in_renorm(gen, mode):
    # Every key of rows 0..2 lies in the span and is dropped: renorm leaves nothing
    # (zeros, -inf), zero mode keeps the denominator (finite lse) and a zero output.
    B, Sq, Sk, Hq, Hkv, D = 1, 6, 9, 2, 1, 64
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, torch.float32)
    ko = Knockout(torch.tensor([3]), torch.tensor([6]), torch.tensor([0]), torch.zeros(1, 6, dtype=torch.bool), mode)
    res = run_triton(q, k, v, True, knockout=ko)
    check(res, golden(q, k, v, knockout=ko), torch.float32)
    assert (res[0][0, :3] == 0).all()
    assert torch.isneginf(res[1][0, :, :3]).all() == (mode == "renorm")


@pytest.mark.parametrize("mode", ["renorm", "zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("which_row", ["first", "last"])
def test_capture_with_knockout_and_padding(gen, mode, dtype, which_row):
    B, Sq, Sk, Hq, Hkv, D, N = 2, 23, 70, 7, 1, 80, 25
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, dtype)
    kpm = torch.ones(B, Sk, dtype=torch.bool)
    kpm[1, :4] = False  # left padding in sample 1
    kpm[0, 33] = False  # a hole inside the image span
    kpm = kpm.to(DEV)
    ko = make_knockout(gen, B, Sk, N, mode, "random", [10, 30], ([60, 47], [70, 69]))
    row = [Sk - Sq, Sk - Sq] if which_row == "first" else [Sk - 1, Sk - 1]
    # Sample 1's capture span runs past the first query row's position: causal zeros there.
    cap = Capture(torch.tensor(row), torch.tensor([10, 40]), N)
    res = run_triton(q, k, v, True, kpm=kpm, knockout=ko, capture=cap)
    check(res, golden(q, k, v, kpm=kpm, knockout=ko, capture=cap), dtype, probs_expected=True)


def test_capture_span_differs_from_knockout_span_and_rows_differ_per_sample(gen):
    B, Sq, Sk, Hq, Hkv, D = 3, 40, 64, 4, 4, 64
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, torch.float32)
    ko = make_knockout(gen, B, Sk, 12, "renorm", "random", [0, 20, 52], ([30, 24, 50], [64, 60, 64]))
    cap = Capture(torch.tensor([63, 24, 50]), torch.tensor([5, 15, 50]), 14)
    res = run_triton(q, k, v, True, knockout=ko, capture=cap)
    check(res, golden(q, k, v, knockout=ko, capture=cap), torch.float32, probs_expected=True)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), (64, 64)])
def test_tile_shapes_and_block_aligned_spans(gen, blocks):
    # Spans that start and end exactly on block edges, and that straddle them, for other tiles.
    B, Sq, Sk, Hq, Hkv, D = 2, 50, 96, 2, 1, 64
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, torch.float32)
    ko = make_knockout(gen, B, Sk, 32, "zero", "random", [32, 17], ([46, 50], [96, 90]))
    cap = Capture(torch.tensor([95, 60]), torch.tensor([32, 17]), 32)
    res = run_triton(q, k, v, True, knockout=ko, capture=cap, tile=tiles.Tile(*blocks))
    check(res, golden(q, k, v, knockout=ko, capture=cap), torch.float32, probs_expected=True)


def test_non_causal_with_everything(gen):
    B, Sq, Sk, Hq, Hkv, D, N = 2, 9, 31, 4, 1, 64, 10
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, torch.float16)
    kpm = (torch.rand(B, Sk, generator=gen) > 0.2).to(DEV)
    ko = make_knockout(gen, B, Sk, N, "renorm", "random", [0, 21], ([22, 0], [31, 31]))
    cap = Capture(torch.tensor([22, 30]), torch.tensor([2, 21]), N)
    res = run_triton(q, k, v, False, kpm=kpm, knockout=ko, capture=cap)
    check(res, golden(q, k, v, causal=False, kpm=kpm, knockout=ko, capture=cap), torch.float16, probs_expected=True)


def test_float64_inputs_computed_in_float32(gen):
    q, k, v = rand_qkv(gen, 1, 5, 12, 2, 1, 64, torch.float64)
    out, lse, _ = run_triton(q, k, v, True)
    assert out.dtype == torch.float64
    g = golden(q, k, v)
    torch.testing.assert_close(out, g[0].to(out.device), atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(lse.double(), g[1].to(out.device), atol=3e-5, rtol=3e-5)


def test_zero_length_capture_and_empty_batch(gen):
    q, k, v = rand_qkv(gen, 2, 3, 8, 2, 1, 64, torch.float32)
    out, lse, probs = run_triton(q, k, v, True, capture=Capture(torch.tensor([7, 7]), torch.tensor([0, 8]), 0))
    assert probs.shape == (2, 2, 0)
    check((out, lse, None), golden(q, k, v), torch.float32)
    q0, k0, v0 = q[:0], k[:0], v[:0]
    out0 = vgkernels.attention(q0, k0, v0, backend="triton")
    assert out0.shape == (0, 3, 2, 64)


def test_matches_reference_module(gen):
    """Same answers as vgkernels.reference (the torch backend) on a mixed case."""
    B, Sq, Sk, Hq, Hkv, D, N = 2, 17, 44, 8, 2, 80, 15
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, torch.float32)
    kpm = torch.ones(B, Sk, dtype=torch.bool, device=DEV)
    kpm[0, :2] = False
    ko = make_knockout(gen, B, Sk, N, "zero", "random", [3, 20], ([27, 30], [44, 40]))
    cap = Capture(torch.tensor([43, 35]), torch.tensor([3, 20]), N)
    kw = dict(key_padding_mask=kpm, knockout=ko, capture=cap)
    got = vgkernels.attention(q, k, v, backend="triton", **kw)
    want = vgkernels.attention(q, k, v, backend="torch", **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=3e-5, rtol=3e-5)


def test_public_api_reaches_the_kernels_for_triton_and_auto(gen, monkeypatch):
    import vgkernels.triton as vt

    calls = []
    real = vt.attention

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(vt, "attention", spy)
    q, k, v = rand_qkv(gen, 1, 4, 9, 2, 1, 64, torch.float32)
    gold = golden(q, k, v)
    backends = ["triton"] + (["auto"] if (DEV == "cuda" or _common.INTERPRET) else [])
    for backend in backends:
        res = vgkernels.attention(q, k, v, return_lse=True, backend=backend)
        check((res.out, res.lse, None), gold, torch.float32)
    assert len(calls) == len(backends)


# ------------------------------------------------------------------- short queries: split-KV

# (B, Sq, Sk, Hq, Hkv, D): decode rows, GQA 1/4/7, several packed row blocks (Sq·G > 16)
SPLIT_SHAPES = [
    (1, 1, 1, 1, 1, 64),
    (3, 1, 77, 28, 4, 64),  # 7B decode: G = 7 rows per K/V head
    (2, 5, 61, 8, 2, 80),  # 20 packed rows: two row blocks of 16
    (1, 16, 16, 4, 4, 128),  # Sq = Sk at the limit of the short-query path
]


@pytest.mark.parametrize("num_splits", [0, 1, 3, 100])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_split_kv_plain(gen, shape, num_splits):
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, torch.float32)
    check(run_triton(q, k, v, True, num_splits=num_splits), golden(q, k, v), torch.float32)


@pytest.mark.parametrize("mode", ["renorm", "zero"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_split_kv_knockout_capture_padding(gen, mode, causal, num_splits):
    # Sample 0: decode-like rows partly inside the knockout band, a hole in the span;
    # sample 1: left padding over the first keys and the captured row knocked out;
    # sample 2: every key padded (empty rows: zeros, lse = -inf, capture all zero).
    B, Sq, Sk, Hq, Hkv, D, N = 3, 6, 75, 7, 1, 64, 21
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, torch.float16)
    kpm = torch.ones(B, Sk, dtype=torch.bool)
    kpm[0, 30] = False
    kpm[1, :12] = False
    kpm[2] = False
    kpm = kpm.to(DEV)
    ko = make_knockout(gen, B, Sk, N, mode, "random", [20, 5, 40], ([71, 0, 69], [73, 75, 75]))
    cap = Capture(torch.tensor([72, 74, 70]), torch.tensor([20, 0, 54]), N)
    res = run_triton(q, k, v, causal, kpm=kpm, knockout=ko, capture=cap, num_splits=num_splits)
    check(res, golden(q, k, v, causal=causal, kpm=kpm, knockout=ko, capture=cap), torch.float16,
          probs_expected=True)
    assert torch.isneginf(res[1][2]).all() and (res[0][2] == 0).all() and (res[2][2] == 0).all()


def test_split_kv_all_keys_knocked_and_capture_past_the_row(gen):
    # renorm with every key of the band knocked: the split partials are all empty and the
    # merge must still give zeros and -inf; the capture span runs past the row (causal 0).
    B, Sq, Sk, Hq, Hkv, D = 1, 3, 9, 4, 2, 64
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, torch.float32)
    ko = Knockout(torch.tensor([6]), torch.tensor([8]), torch.tensor([0]), torch.zeros(1, 9, dtype=torch.bool), "renorm")
    cap = Capture(torch.tensor([6]), torch.tensor([2]), 7)
    res = run_triton(q, k, v, True, knockout=ko, capture=cap, num_splits=3)
    check(res, golden(q, k, v, knockout=ko, capture=cap), torch.float32, probs_expected=True)
    assert torch.isneginf(res[1][0, :, :2]).all() and (res[2] == 0).all()


def test_short_queries_take_the_split_kernel(gen, monkeypatch):
    launched = []
    for name in ("_attn_fwd_kernel", "_attn_split_kernel"):
        real = getattr(flash, name)
        monkeypatch.setattr(flash, name, _Spy(real, name, launched))
    q, k, v = rand_qkv(gen, 1, tiles.SHORT_QUERY_MAX, 40, 2, 1, 64, torch.float32)
    check(run_triton(q, k, v), golden(q, k, v), torch.float32)
    q2 = torch.cat([q, q[:, :1]], dim=1)
    check(run_triton(q2, k, v), golden(q2, k, v), torch.float32)
    assert launched == ["_attn_split_kernel", "_attn_fwd_kernel"]


class _Spy:
    def __init__(self, real, name, log):
        self.real, self.name, self.log = real, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.real[grid]


# --------------------------------------------------------------------- the tile table

def _distinct_tiles(kernel):
    """Every (block_m, block_n, tma) the table holds for ``kernel``, over all keys."""
    out = set()
    for key in tiles.all_keys(kernel):
        for t in tiles.TABLE[key]:
            t = tiles.Tile(*t)
            out.add((t.block_m, t.block_n, t.tma))
    return sorted(out)


def test_table_is_complete_and_valid():
    for kernel in tiles.KERNELS:
        for arch in tiles.ARCHS:
            for d in (64, 80, 96, 128, 256):
                for dtype in (torch.bfloat16, torch.float16, torch.float32):
                    for ko in (False, True):
                        cfgs = tiles.configs(kernel, arch, d, dtype, ko)
                        assert cfgs, (kernel, arch, d, dtype, ko)
                        for t in cfgs:
                            assert t.block_m >= 16 and t.block_n >= 16 and t.num_warps in (2, 4, 8, 16)
                            assert not (t.tma and arch != "sm90"), (kernel, arch, t)
                            assert triton.next_power_of_2(t.block_m) == t.block_m


@pytest.mark.parametrize("blocks", _distinct_tiles("attn"), ids=lambda b: "x".join(map(str, b)))
def test_every_table_tile_of_the_fused_kernel(gen, blocks):
    bm, bn, tma = blocks
    B, Sq, Sk, Hq, Hkv, D, N = 1, bm + 9, bm + 40, 2, 1, 64, bn + 5
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, torch.float32)
    kpm = torch.ones(B, Sk, dtype=torch.bool, device=DEV)
    kpm[0, :3] = False
    ko = make_knockout(gen, B, Sk, N, "zero", "random", [7], ([7 + N], [Sk]))
    cap = Capture(torch.tensor([Sk - 1]), torch.tensor([7]), N)
    with tiles.forced(tiles.Tile(bm, bn, 4, 2, tma), "attn"):
        res = run_triton(q, k, v, True, kpm=kpm, knockout=ko, capture=cap)
    check(res, golden(q, k, v, kpm=kpm, knockout=ko, capture=cap), torch.float32, probs_expected=True)


@pytest.mark.parametrize("blocks", _distinct_tiles("attn_split"), ids=lambda b: "x".join(map(str, b)))
def test_every_table_tile_of_the_split_kernel(gen, blocks):
    bm, bn, tma = blocks
    B, Sq, Sk, Hq, Hkv, D, N = 1, 13, 2 * bn + 30, 8, 2, 64, bn + 3  # 52 packed rows
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, torch.float32)
    ko = make_knockout(gen, B, Sk, N, "renorm", "random", [4], ([Sk - 5], [Sk]))
    cap = Capture(torch.tensor([Sk - 1]), torch.tensor([4]), N)
    with tiles.forced(tiles.Tile(bm, bn, 4, 2, tma), "attn_split"):
        res = run_triton(q, k, v, True, knockout=ko, capture=cap)
    check(res, golden(q, k, v, knockout=ko, capture=cap), torch.float32, probs_expected=True)


def test_forced_tile_is_restored_and_tuned_file_is_read(tmp_path, monkeypatch):
    import json
    import warnings

    t = tiles.Tile(32, 16, 4, 2)
    with tiles.forced(t, "attn"):
        assert tiles.lookup("attn", "cuda", 128, torch.bfloat16, True) == t
        assert tiles.lookup("attn_split", "cpu", 128, torch.bfloat16, True) == tiles.INTERPRETER_TILE
    assert tiles.lookup("attn", "cpu", 128, torch.bfloat16, True) == tiles.INTERPRETER_TILE
    path = tmp_path / "tiles.json"
    key = tiles.key("attn", "sm90", 128, torch.bfloat16, True)
    path.write_text(json.dumps({"device": "NVIDIA H200", "triton": triton.__version__,
                                "tiles": {key: [64, 64, 4, 3, True]}}))
    assert tiles.read_override(str(path), "NVIDIA H200") == {key: tiles.Tile(64, 64, 4, 3, True)}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert tiles.read_override(str(path), "NVIDIA A100-SXM4-80GB") == {}
    assert any("written for 'NVIDIA H200'" in str(x.message) for x in w)
    monkeypatch.setenv("VGKERNELS_TILES", str(path))
    assert tiles.override_path("NVIDIA H200") == str(path)
    monkeypatch.delenv("VGKERNELS_TILES")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tiles.override_path("NVIDIA H200") == str(tmp_path / "vgkernels" / "tiles-nvidia-h200.json")


def test_tune_script_needs_a_gpu_or_dry_run():
    import subprocess
    import sys

    root = __file__.rsplit("/tests/", 1)[0]
    r = subprocess.run([sys.executable, f"{root}/bench/tune.py"], capture_output=True, text=True,
                       env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""}, timeout=300)
    assert r.returncode == 2 and "CUDA GPU" in r.stderr and "--dry-run" in r.stderr, (r.stdout, r.stderr)
    r = subprocess.run([sys.executable, f"{root}/bench/tune.py", "--dry-run", "--only", "d128/16bit/ko"],
                       capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""}, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("attn")]
    want = sum(len(tiles.TABLE[k]) for k in tiles.TABLE if "d128/16bit/ko" in k)
    assert len(lines) == want and want > 0


def test_tune_writes_the_file_the_library_reads(tmp_path, monkeypatch):
    """bench/tune.py's output is what tiles.read_override takes: here on tiny shapes in the
    interpreter, with a timer under which the last tile of each key is the fastest."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vg_tune", __file__.rsplit("/tests/", 1)[0] + "/bench/tune.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    monkeypatch.setattr(tune, "problem", lambda kernel, d, dtc, ko: dict(
        B=1, Sq=20 if kernel == "attn" else 2, Sk=60, Hq=2, Hkv=1, D=d, dtype=dtc, knockout=ko, capture=ko,
        padding=ko, N=8))
    runs = []

    def timer(fn):
        fn()
        runs.append(1)
        return 1.0 / len(runs)

    path = tmp_path / "tiles.json"
    tune.run_tuning(torch.device("cpu"), "Test GPU", "sm90", str(path), only="d64/fp32", timer=timer)
    got = tiles.read_override(str(path), "Test GPU")
    keys = [k for k in tiles.all_keys(arch="sm90") if "d64/fp32" in k]
    assert sorted(got) == sorted(keys) and len(runs) == sum(len(tiles.TABLE[k]) for k in keys)
    for k in keys:
        kernel, _, _, _, feat = k.split("/")
        assert got[k] == tiles.configs(kernel, "sm90", 64, torch.float32, feat == "ko")[-1]


# ----------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
def test_gpu_head_dims(gen, dtype, D):
    B, Sq, Sk, Hq, Hkv, N = 2, 300, 700, 8, 2, 200
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, dtype)
    ko = make_knockout(gen, B, Sk, N, "renorm", "random", [35, 100], ([400, 420], [700, 650]))
    cap = Capture(torch.tensor([699, 640]), torch.tensor([35, 100]), N)
    res = run_triton(q, k, v, True, knockout=ko, capture=cap)
    check(res, golden(q, k, v, knockout=ko, capture=cap), dtype, probs_expected=True)


def _reference_check(res, q, k, v, dtype, **kw):
    """Long GPU cases: the chunked torch reference in float32 on the GPU replaces the golden."""
    args = check_attention(q, k, v, True, None, kw.get("kpm"), kw.get("knockout"),
                                               kw.get("capture"))
    want = ref_mod.attention_ref(args.q, args.k, args.v, True, args.scale, args.key_padding_mask, args.knockout,
                                 args.capture, True)
    t_out, t_lse, t_probs = TOL[dtype]
    out, lse, probs = res
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.float(), want[0].float(), atol=t_out, rtol=t_out)
    fin = torch.isfinite(want[1])
    assert torch.equal(fin, torch.isfinite(lse))
    torch.testing.assert_close(lse[fin], want[1][fin], atol=t_lse, rtol=t_lse)
    if probs is not None:
        assert not torch.isnan(probs).any()
        torch.testing.assert_close(probs, want[2], atol=t_probs, rtol=t_probs)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["renorm", "zero"])
@pytest.mark.parametrize("B,S", [(1, 16384), (16, 1200), (8, 2900)])
def test_gpu_long_sequences_bf16(gen, mode, B, S):
    Hq, Hkv, D, N = 28, 4, 128, 576
    q, k, v = rand_qkv(gen, B, S, S, Hq, Hkv, D, torch.bfloat16)
    kpm = torch.ones(B, S, dtype=torch.bool, device=DEV)
    kpm[B - 1, : S // 10] = False  # left padding in the last sample
    ks = [min(S - N, 40 + 3 * b) for b in range(B)]
    ko = make_knockout(gen, B, S, N, mode, "random", ks, ([x + N for x in ks], [S] * B))
    cap = Capture(torch.tensor([S - 1] * B), torch.tensor(ks), N)
    res = run_triton(q, k, v, True, kpm=kpm, knockout=ko, capture=cap)
    _reference_check(res, q, k, v, torch.bfloat16, kpm=kpm, knockout=ko, capture=cap)


@pytest.mark.gpu
def test_gpu_decode_rows_and_sq_less_than_sk(gen):
    for Sq in (1, 7, 129):
        q, k, v = rand_qkv(gen, 4, Sq, 4000, 32, 32, 128, torch.bfloat16)
        ko = make_knockout(gen, 4, 4000, 576, "zero", "random", [35] * 4, ([0] * 4, [4000] * 4))
        cap = Capture(torch.tensor([3999] * 4), torch.tensor([35] * 4), 576)
        res = run_triton(q, k, v, True, knockout=ko, capture=cap)
        _reference_check(res, q, k, v, torch.bfloat16, knockout=ko, capture=cap)


def _gpu_table_cases():
    """(key, tile) for every entry of this GPU's architecture; empty without a GPU."""
    if not torch.cuda.is_available():
        return [pytest.param(None, None, id="no-gpu")]
    arch = tiles.arch_class(torch.device("cuda"))
    return [pytest.param(k, tiles.Tile(*t), id=f"{k}-{'x'.join(map(str, t))}")
            for k in tiles.all_keys(arch=arch) for t in tiles.TABLE[k]]


@pytest.mark.gpu
@pytest.mark.parametrize("key,tile", _gpu_table_cases())
def test_gpu_every_table_tile(gen, key, tile):
    """Each tile of this GPU's table, forced, on a shape that crosses its block edges."""
    kernel, _, d, dtc, feat = key.split("/")
    D = {"d64": 64, "d128": 128, "d256": 256}[d]
    dtype = torch.bfloat16 if dtc == "16bit" else torch.float32
    if kernel == "attn":
        B, Sq, Sk, Hq, Hkv = 2, 2 * tile.block_m + 37, 2 * tile.block_m + 300, 4, 2
    else:
        B, Sq, Sk, Hq, Hkv = 3, 9, 8 * tile.block_n + 77, 28, 4  # 63 packed rows per K/V head
    N = 200
    q, k, v = rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, dtype)
    kpm = torch.ones(B, Sk, dtype=torch.bool, device=DEV)
    kpm[-1, :20] = False
    ko = cap = None
    if feat == "ko":
        ko = make_knockout(gen, B, Sk, N, "zero", "random", [30] * B, ([Sk - Sq + 3] * B, [Sk] * B))
        cap = Capture(torch.tensor([Sk - 1] * B), torch.tensor([30] * B), N)
    with tiles.forced(tile, kernel):
        res = run_triton(q, k, v, True, kpm=kpm, knockout=ko, capture=cap)
    check(res, golden(q, k, v, kpm=kpm, knockout=ko, capture=cap), dtype, probs_expected=cap is not None)
