"""The torch backend of vgkernels.attention against the float64 golden implementation."""
import math

import pytest
import torch

import vgkernels as vg
from golden import dense_attention

# (B, Sq, Sk, Hkv, G, D): Sq=1 decode, Sq<Sk suffixes, odd lengths, every GQA group size.
SHAPES = [
    (1, 1, 1, 1, 1, 64),
    (2, 1, 7, 2, 4, 64),
    (2, 7, 7, 1, 7, 80),
    (1, 5, 97, 2, 1, 128),
    (2, 13, 29, 3, 4, 80),
]
# Tolerances: fp32 attention of these sizes errs ~1e-6 against float64; fp16 inputs
# are compared after the golden sees the same (rounded) fp16 values, leaving only the
# output's rounding (~5e-4 relative).
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.float64: dict(atol=1e-10, rtol=1e-10)}


def make(gen, B, Sq, Sk, Hkv, G, D, dtype=torch.float32):
    q = torch.randn(B, Sq, Hkv * G, D, generator=gen).to(dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, Sk, Hkv, D, generator=gen).to(dtype)
    return q, k, v


def random_knockout(gen, B, Sq, Sk, mode, keep_kind="random"):
    ks, ns, qs, qe = [], [], [], []
    N = max(1, Sk // 3)
    for _ in range(B):
        start = int(torch.randint(0, Sk - N + 1, (1,), generator=gen))
        ks.append(start)
        a = int(torch.randint(0, Sk + 1, (1,), generator=gen))
        b = int(torch.randint(0, Sk + 1, (1,), generator=gen))
        qs.append(min(a, b))
        qe.append(max(a, b))
    if keep_kind == "random":
        keep = torch.rand(B, N, generator=gen) > 0.5
    else:
        keep = torch.full((B, N), keep_kind == "all", dtype=torch.bool)
    return vg.Knockout(torch.tensor(qs), torch.tensor(qe), torch.tensor(ks), keep, mode)


def golden_ko(ko):
    return None if ko is None else dict(query_start=ko.query_start, query_end=ko.query_end,
                                        key_start=ko.key_start, keep=ko.keep, mode=ko.mode)


def check(res, golden, dtype):
    out, lse, probs = golden
    tol = TOL[dtype]
    torch.testing.assert_close(res.out.double(), out, **tol)
    finite = torch.isfinite(lse)
    assert torch.equal(torch.isfinite(res.lse), finite)
    assert torch.equal(res.lse[~finite], lse[~finite].float())
    torch.testing.assert_close(res.lse.double()[finite], lse[finite], **tol)
    assert not torch.isnan(res.out).any()
    if probs is not None:
        torch.testing.assert_close(res.probs.double(), probs, **tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_plain_matches_golden(gen, shape, causal):
    q, k, v = make(gen, *shape)
    res = vg.attention(q, k, v, causal=causal, return_lse=True, backend="torch")
    assert res.out.dtype == q.dtype and res.lse.dtype == torch.float32 and res.probs is None
    check(res, dense_attention(q, k, v, causal=causal), torch.float32)


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("mode", ["renorm", "zero"])
@pytest.mark.parametrize("keep_kind", ["random", "all", "none"])
@pytest.mark.parametrize("padding", ["left", "right", None])
def test_knockout_capture_padding(gen, shape, mode, keep_kind, padding):
    B, Sq, Sk, Hkv, G, D = shape
    q, k, v = make(gen, *shape)
    kpm = None
    if padding:
        kpm = torch.ones(B, Sk, dtype=torch.bool)
        for b in range(B):
            n_pad = int(torch.randint(0, Sk, (1,), generator=gen))
            if padding == "left":
                kpm[b, :n_pad] = False
            else:
                kpm[b, Sk - n_pad:] = False
    ko = random_knockout(gen, B, Sq, Sk, mode, keep_kind)
    N = ko.keep.shape[1]
    row_choice = [Sk - Sq, Sk - 1]
    rows = torch.tensor([row_choice[b % 2] for b in range(B)])
    cap = vg.Capture(rows, ko.key_start, N)
    res = vg.attention(q, k, v, key_padding_mask=kpm, knockout=ko, capture=cap, backend="torch")
    gold = dense_attention(q, k, v, kpm=kpm, knockout=golden_ko(ko),
                           capture=dict(row=rows, key_start=ko.key_start, length=N))
    check(res, gold, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(gen, dtype):
    q, k, v = make(gen, 2, 6, 11, 2, 2, 64, dtype)
    ko = random_knockout(gen, 2, 6, 11, "zero")
    res = vg.attention(q, k, v, knockout=ko, return_lse=True, backend="torch")
    assert res.out.dtype == dtype and res.lse.dtype == torch.float32
    tol = TOL.get(dtype, dict(atol=2e-2, rtol=2e-2))
    out, lse, _ = dense_attention(q, k, v, knockout=golden_ko(ko))
    torch.testing.assert_close(res.out.double(), out, **tol)


def test_spans_at_sequence_edges(gen):
    B, Sq, Sk, D = 2, 4, 10, 64
    q, k, v = make(gen, B, Sq, Sk, 1, 2, D)
    keep = torch.tensor([[False, True, False], [True, False, False]])
    # Sample 0's image starts at key 0, sample 1's ends at the last key.
    ko = vg.Knockout(torch.tensor([0, 6]), torch.tensor([10, 10]), torch.tensor([0, 7]), keep, "renorm")
    cap = vg.Capture(torch.tensor([6, 9]), torch.tensor([0, 7]), 3)
    res = vg.attention(q, k, v, knockout=ko, capture=cap, backend="torch")
    gold = dense_attention(q, k, v, knockout=golden_ko(ko), capture=dict(row=cap.row, key_start=cap.key_start, length=3))
    check(res, gold, torch.float32)
    assert (res.probs[:, :, ~keep[0]][0] == 0).all()


def test_keep_all_true_equals_no_knockout(gen):
    q, k, v = make(gen, 2, 9, 17, 2, 4, 64)
    base = vg.attention(q, k, v, return_lse=True, backend="torch")
    for mode in ("renorm", "zero"):
        ko = vg.Knockout(torch.tensor([0, 3]), torch.tensor([17, 12]), torch.tensor([2, 5]),
                         torch.ones(2, 6, dtype=torch.bool), mode)
        res = vg.attention(q, k, v, knockout=ko, return_lse=True, backend="torch")
        assert torch.equal(res.out, base.out) and torch.equal(res.lse, base.lse)


def test_row_sums_by_mode(gen):
    """zero: an affected row sums to 1 minus the dropped mass; renorm: to 1."""
    B, Sk, N, start = 2, 20, 8, 4
    q, k, v = make(gen, B, Sk, Sk, 2, 2, 64)
    keep = torch.rand(B, N, generator=gen) > 0.4
    row = torch.tensor([Sk - 1, Sk - 2])
    full = vg.attention(q, k, v, capture=vg.Capture(row, torch.zeros(B, dtype=torch.long), Sk), backend="torch")
    dropped = full.probs[:, :, start:start + N].masked_fill(keep[:, None], 0).sum(-1)
    for mode, expect in (("zero", 1 - dropped), ("renorm", torch.ones_like(dropped))):
        ko = vg.Knockout(torch.full((B,), start + N), torch.full((B,), Sk), torch.full((B,), start), keep, mode)
        res = vg.attention(q, k, v, knockout=ko, capture=vg.Capture(row, torch.zeros(B, dtype=torch.long), Sk),
                           backend="torch")
        torch.testing.assert_close(res.probs.sum(-1), expect, atol=1e-5, rtol=1e-5)
        if mode == "zero":  # kept probabilities are untouched, not renormalised
            kept = torch.cat([torch.ones(B, start, dtype=torch.bool), keep,
                              torch.ones(B, Sk - start - N, dtype=torch.bool)], 1)
            torch.testing.assert_close(res.probs.masked_fill(~kept[:, None], 0), full.probs.masked_fill(~kept[:, None], 0))


def test_row_without_keys_is_zero_and_neg_inf(gen):
    q, k, v = make(gen, 2, 4, 6, 1, 2, 64)
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[0] = False           # sample 0: every key is padding
    kpm[1, :4] = False       # sample 1, causal: row at position 2 sees keys 0..2, all padded
    res = vg.attention(q, k, v, key_padding_mask=kpm, return_lse=True, backend="torch")
    assert not torch.isnan(res.out).any() and not torch.isnan(res.lse).any()
    assert (res.out[0] == 0).all() and torch.isneginf(res.lse[0]).all()
    assert (res.out[1, :2] == 0).all() and torch.isneginf(res.lse[1, :, :2]).all()
    assert torch.isfinite(res.lse[1, :, 2:]).all()
    # renorm knockout of every key a row could see also leaves it empty
    ko = vg.Knockout(torch.tensor([0, 0]), torch.tensor([6, 6]), torch.tensor([0, 0]),
                     torch.zeros(2, 6, dtype=torch.bool), "renorm")
    res = vg.attention(q, k, v, knockout=ko, capture=vg.Capture(torch.tensor([5, 5]), torch.tensor([0, 0]), 6),
                       backend="torch")
    assert (res.out == 0).all() and torch.isneginf(res.lse).all() and (res.probs == 0).all()


def test_chunked_reference_memory_is_bounded(gen, monkeypatch):
    """The reference walks query rows in chunks: its score matrices hold chunk·Hq·Sk
    elements, not Sq·Hq·Sk, and the result does not depend on the chunk size."""
    from vgkernels import reference

    q, k, v = make(gen, 1, 300, 300, 1, 2, 64)
    largest = []
    real_einsum = torch.einsum

    def recording_einsum(eq, *ops):
        r = real_einsum(eq, *ops)
        largest.append(r.numel())
        return r

    monkeypatch.setattr(reference.torch, "einsum", recording_einsum)
    b = reference.attention_ref(q, k, v, True, 0.125, chunk_size=37)
    assert max(largest) <= 37 * 2 * 300
    monkeypatch.undo()
    a = reference.attention_ref(q, k, v, True, 0.125, chunk_size=300)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_return_value_forms(gen):
    q, k, v = make(gen, 1, 3, 5, 1, 1, 64)
    out = vg.attention(q, k, v, backend="torch")
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    res = vg.attention(q, k, v, return_lse=True, backend="torch")
    assert isinstance(res, vg.AttentionResult) and res.probs is None
    torch.testing.assert_close(res.out, out)
    scale = 0.3
    gold = dense_attention(q, k, v, scale=scale)
    torch.testing.assert_close(vg.attention(q, k, v, softmax_scale=scale, backend="torch").double(), gold[0],
                               **TOL[torch.float32])


def test_strided_inputs(gen):
    """Transformers hands (B, H, S, D) tensors; their transposes are accepted as-is."""
    qt = torch.randn(2, 4, 9, 64, generator=gen)
    kt = torch.randn(2, 2, 9, 64, generator=gen)
    vt = torch.randn(2, 2, 9, 64, generator=gen)
    q, k, v = qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2)
    assert not q.is_contiguous()
    res = vg.attention(q, k, v, backend="torch")
    torch.testing.assert_close(res.double(), dense_attention(q, k, v)[0], **TOL[torch.float32])


def test_capture_from_lse_rebuilds_rows(gen):
    B, S, Hkv, G, D = 2, 15, 2, 4, 80
    q, k, v = make(gen, B, S, S, Hkv, G, D)
    keep = torch.rand(B, 6, generator=gen) > 0.5
    ks = torch.tensor([3, 9])
    res = vg.attention(q, k, v, return_lse=True, capture=vg.Capture(torch.tensor([S - 1, S - 1]), ks, 6),
                       backend="torch")
    p = vg.capture_from_lse(q[:, -1], k, res.lse[:, :, -1], ks, 6, backend="torch")
    torch.testing.assert_close(p, res.probs, atol=1e-6, rtol=1e-5)
    pk = vg.capture_from_lse(q[:, -1], k, res.lse[:, :, -1], ks, 6, keep=keep, backend="torch")
    torch.testing.assert_close(pk, res.probs * keep[:, None], atol=1e-6, rtol=1e-5)
    # Against SDPA's own log-sum-exp where this torch exposes it.
    scale = 1 / math.sqrt(D)
    s = torch.einsum("bhd,bshd->bhs", q[:, -1].double(), k.double().repeat_interleave(G, 2)) * scale
    lse = torch.logsumexp(s, -1)
    gold = torch.exp(s - lse[..., None])[:, :, None, :].squeeze(2)
    idx = ks[:, None] + torch.arange(6)
    gold = torch.gather(gold, 2, idx[:, None].expand(B, Hkv * G, 6))
    torch.testing.assert_close(vg.capture_from_lse(q[:, -1], k, lse.float(), ks, 6, backend="torch").double(), gold,
                               atol=1e-6, rtol=1e-5)
