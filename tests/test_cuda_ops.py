"""The CUDA extension's operators against float64 golden models and the Triton backend.

Runs where CUDA and the compiled ``vgkernels._C`` are present (marked ``cuda_ext`` and
``gpu``; conftest skips them on machines without a GPU). The golden models below are
written here, densely and in float64, from SPEC §2-§3's sentences. Outputs are allocated
inside the operators, so every test first fills the CUDA caching allocator's free blocks
with NaN (``poison_allocator``): an element a kernel does not write — including a
split-KV partial that the merge reads — comes back as NaN and fails.

Tolerances: out is compared with ``3 x`` the error that the same mathematics makes when
rounded at the input dtype the way a flash kernel rounds (fp32 scores, P rounded to the
dtype before P.V), plus one output ulp; lse and probabilities come from fp32 arithmetic
on the same rounded inputs.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vgkernels
from vgkernels import Capture, Knockout

pytestmark = [pytest.mark.cuda_ext, pytest.mark.gpu]

DEV = "cuda"
ROOT = Path(__file__).resolve().parents[1]
OUT_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def cb():
    """The CUDA backend module (imports vgkernels._C)."""
    from vgkernels import _cuda_backend

    return _cuda_backend


def poison_allocator():
    """Fill free blocks of the caching allocator with NaN so fresh outputs start as NaN."""
    keep = []
    for mib in (1, 2, 8, 32, 128):
        for _ in range(4):
            keep.append(torch.full((mib * 2**18,), float("nan"), device=DEV))
    small = [torch.full((n,), float("nan"), device=DEV) for n in (64, 256, 1024, 4096, 16384, 65536) for _ in range(8)]
    torch.cuda.synchronize()
    del keep, small


# ---------------------------------------------------------------------------------------
# Golden models (float64, dense)
# ---------------------------------------------------------------------------------------


def dense_masks(B, Sq, Sk, causal, kpm, ko):
    """allowed (B, Sq, Sk) and knocked (B, Sq, Sk), straight from the SPEC's definitions."""
    pos = torch.arange(Sk - Sq, Sk, device=DEV)
    keys = torch.arange(Sk, device=DEV)
    allowed = torch.ones(B, Sq, Sk, dtype=torch.bool, device=DEV)
    if causal:
        allowed &= keys[None, None, :] <= pos[None, :, None]
    if kpm is not None:
        allowed &= kpm[:, None, :]
    knocked = torch.zeros(B, Sq, Sk, dtype=torch.bool, device=DEV)
    if ko is not None:
        N = ko.keep.shape[1]
        for b in range(B):
            rows = (pos >= int(ko.query_start[b])) & (pos < int(ko.query_end[b]))
            ks = int(ko.key_start[b])
            dropped = torch.zeros(Sk, dtype=torch.bool, device=DEV)
            dropped[ks: ks + N] = ~ko.keep[b]
            knocked[b] = rows[:, None] & dropped[None, :]
    return allowed, knocked


def golden_attention(q, k, v, causal, scale, kpm=None, ko=None, cap=None, *, round_to=None):
    """out (B,Sq,Hq,D), lse (B,Hq,Sq), probs (B,Hq,N)|None in float64.

    round_to=dtype instead mimics a flash kernel at that dtype (fp32 scores, P rounded
    to the dtype for P.V) — the yardstick of the tolerances.
    """
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    cdt = torch.float64 if round_to is None else torch.float32
    qd = q.to(cdt)
    kd = k.to(cdt).repeat_interleave(G, dim=2)
    vd = v.to(cdt).repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    allowed, knocked = dense_masks(B, Sq, Sk, causal, kpm, ko)
    zero = ko is not None and ko.mode == "zero"
    denom = allowed if zero else allowed & ~knocked
    s = s.masked_fill(~denom[:, None], -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(denom[:, None], torch.exp(s - lse[..., None]), torch.zeros((), dtype=cdt, device=DEV))
    if zero:
        p = p.masked_fill(knocked[:, None], 0.0)
    pv = p if round_to is None else p.to(round_to).to(cdt)
    out = torch.einsum("bhqk,bkhd->bqhd", pv, vd)
    if round_to is not None:
        out = out.to(round_to)
    probs = None
    if cap is not None:
        probs = torch.zeros(B, Hq, cap.length, dtype=torch.float64, device=DEV)
        for b in range(B):
            r = int(cap.row[b]) - (Sk - Sq)
            ks = int(cap.key_start[b])
            probs[b] = p[b, :, r, ks: ks + cap.length].double()
    return out.double(), lse.double(), probs


def check_attention_result(out, lse, probs, q, k, v, causal, scale, kpm, ko, cap):
    g_out, g_lse, g_probs = golden_attention(q, k, v, causal, scale, kpm, ko, cap)
    l_out, _, _ = golden_attention(q, k, v, causal, scale, kpm, ko, None, round_to=q.dtype)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any(), "unwritten (NaN) output elements"
    base = (l_out - g_out).abs().max().item()
    err = (out.double() - g_out).abs().max().item()
    assert err <= 3 * base + OUT_FLOOR[q.dtype], f"out error {err:.3g} vs dtype yardstick {base:.3g}"
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == g_lse.shape
        assert not torch.isnan(lse).any()
        empty = torch.isneginf(g_lse)
        assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly for rows with no key"
        torch.testing.assert_close(lse.double()[~empty], g_lse[~empty], atol=1e-3, rtol=1e-5)
    if cap is not None:
        assert probs is not None and probs.dtype == torch.float32 and probs.shape == g_probs.shape
        assert not torch.isnan(probs).any()
        torch.testing.assert_close(probs.double(), g_probs, atol=2e-5, rtol=2e-3)


# ---------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------


def rand_qkv(gen, B, Sq, Sk, Hq, Hkv, D, dtype):
    q = torch.randn(B, Sq, Hq, D, generator=gen).to(DEV, dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=gen).to(DEV, dtype)
    v = torch.randn(B, Sk, Hkv, D, generator=gen).to(DEV, dtype)
    return q, k, v


def randint(gen, lo, hi):
    """Uniform in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def rand_knockout(gen, B, Sq, Sk, mode):
    N = randint(gen, 1, min(Sk, 600))
    ks = [randint(gen, 0, Sk - N) for _ in range(B)]
    if B > 1:
        ks[0], ks[-1] = 0, Sk - N  # spans at both edges of the keys
    qs, qe = [], []
    for _ in range(B):
        a = randint(gen, 0, Sk)
        qs.append(min(a, Sk - Sq + randint(gen, 0, Sq - 1)))  # usually inside the block
        qe.append(randint(gen, qs[-1], Sk))
    keep = torch.rand(B, N, generator=gen) >= 0.5
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=DEV)  # noqa: E731
    return Knockout(t(qs), t(qe), t(ks), keep.to(DEV), mode)


def rand_capture(gen, B, Sq, Sk):
    N = randint(gen, 1, min(Sk, 700))
    rows = [randint(gen, Sk - Sq, Sk - 1) for _ in range(B)]
    rows[-1] = Sk - 1
    ks = [randint(gen, 0, Sk - N) for _ in range(B)]
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=DEV)  # noqa: E731
    return Capture(t(rows), t(ks), N)


def rand_padding(gen, B, Sk):
    kpm = torch.rand(B, Sk, generator=gen) >= 0.1
    for b in range(B):
        kpm[b, : randint(gen, 0, Sk // 3)] = False  # left padding
    return kpm.to(DEV)


# ---------------------------------------------------------------------------------------
# Short-query attention
# ---------------------------------------------------------------------------------------

SHAPES = [(1, 1), (1, 577), (7, 97), (32, 4096), (97, 577), (128, 1500)]


@pytest.mark.parametrize("Sq,Sk", SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("D", [64, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_plain(cb, gen, dtype, D, G, Sq, Sk):
    Hkv = 2
    q, k, v = rand_qkv(gen, 2, Sq, Sk, G * Hkv, Hkv, D, dtype)
    scale = 1.0 / math.sqrt(D)
    poison_allocator()
    out, lse, probs = cb.attention(q, k, v, True, scale, None, None, None, True)
    assert probs is None
    check_attention_result(out, lse, None, q, k, v, True, scale, None, None, None)


@pytest.mark.parametrize("num_splits", [0, 1, 3, 64])
@pytest.mark.parametrize("capture", [False, True], ids=["nocap", "cap"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("mode", [None, "renorm", "zero"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_features(cb, gen, dtype, causal, mode, padding, capture, num_splits):
    B, Sq, Sk, Hkv, G, D = 3, 33, 700, 2, 7, 80 if num_splits == 3 else 128
    q, k, v = rand_qkv(gen, B, Sq, Sk, G * Hkv, Hkv, D, dtype)
    scale = 0.7 / math.sqrt(D)
    kpm = rand_padding(gen, B, Sk) if padding else None
    ko = rand_knockout(gen, B, Sq, Sk, mode) if mode else None
    cap = rand_capture(gen, B, Sq, Sk) if capture else None
    poison_allocator()
    out, lse, probs = cb.attention(q, k, v, causal, scale, kpm, ko, cap, True, num_splits=num_splits)
    check_attention_result(out, lse, probs, q, k, v, causal, scale, kpm, ko, cap)


@pytest.mark.parametrize("mode", ["renorm", "zero"])
def test_rows_without_keys_give_zeros_and_minus_inf(cb, gen, mode):
    B, Sq, Sk, Hkv, G, D = 2, 5, 200, 1, 4, 64
    q, k, v = rand_qkv(gen, B, Sq, Sk, G, Hkv, D, torch.float16)
    kpm = torch.ones(B, Sk, dtype=torch.bool, device=DEV)
    kpm[1] = False  # batch item 1 attends nothing
    # Item 0: every key up to the second row's position is in the span and knocked out
    # for the first two rows, so under renorm those rows have no key left.
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=DEV)  # noqa: E731
    N = Sk - Sq + 2
    ko = Knockout(t([Sk - Sq, 0]), t([Sk - Sq + 2, 0]), t([0, 0]), torch.zeros(B, N, dtype=torch.bool, device=DEV),
                  mode)
    cap = Capture(t([Sk - Sq, Sk - 1]), t([0, 0]), 50)
    poison_allocator()
    out, lse, probs = cb.attention(q, k, v, True, 1.0 / math.sqrt(D), kpm, ko, cap, True, num_splits=2)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
    if mode == "renorm":
        assert torch.all(out[0, :2] == 0) and torch.all(torch.isneginf(lse[0, :, :2]))
    assert torch.all(probs == 0), "knocked-out and unattended keys have probability 0"
    check_attention_result(out, lse, probs, q, k, v, True, 1.0 / math.sqrt(D), kpm, ko, cap)


def test_attention_agrees_with_triton(cb, gen):
    B, Sq, Sk, Hkv, G, D = 2, 32, 1024, 4, 7, 128
    q, k, v = rand_qkv(gen, B, Sq, Sk, G * Hkv, Hkv, D, torch.bfloat16)
    kpm = rand_padding(gen, B, Sk)
    ko = rand_knockout(gen, B, Sq, Sk, "renorm")
    cap = rand_capture(gen, B, Sq, Sk)
    poison_allocator()
    res_c = vgkernels.attention(q, k, v, key_padding_mask=kpm, knockout=ko, capture=cap, backend="cuda")
    res_t = vgkernels.attention(q, k, v, key_padding_mask=kpm, knockout=ko, capture=cap, backend="triton")
    g_out, g_lse, g_probs = golden_attention(q, k, v, True, 1.0 / math.sqrt(D), kpm, ko, cap)
    err_c = (res_c.out.double() - g_out).abs().max().item()
    err_t = (res_t.out.double() - g_out).abs().max().item()
    assert err_c <= 2 * err_t + OUT_FLOOR[torch.bfloat16], (err_c, err_t)
    torch.testing.assert_close(res_c.lse, res_t.lse, atol=5e-3, rtol=1e-4)
    torch.testing.assert_close(res_c.probs, res_t.probs, atol=5e-3, rtol=1e-2)


def test_attention_strided_inputs(cb, gen):
    """q/k/v as views of fused buffers (non-contiguous heads) and a misaligned view."""
    B, Sq, Sk, Hkv, G, D = 2, 9, 300, 2, 4, 64
    Hq = G * Hkv
    qkv = torch.randn(B, Sk, Hq + 2 * Hkv, D, generator=gen).to(DEV, torch.float16)
    q = qkv[:, Sk - Sq:, :Hq]
    k = qkv[:, :, Hq: Hq + Hkv]
    v = qkv[:, :, Hq + Hkv:]
    poison_allocator()
    out, lse, _ = cb.attention(q, k, v, True, 0.125, None, None, None, True)
    check_attention_result(out, lse, None, q, k, v, True, 0.125, None, None, None)
    flat = torch.randn(B * Sk * Hkv * D + 3, generator=gen).to(DEV, torch.float16)
    k2 = flat[3:].view(B, Sk, Hkv, D)  # data pointer 6 bytes off 16: copied, still right
    out2, lse2, _ = cb.attention(q, k2, v, True, 0.125, None, None, None, True)
    check_attention_result(out2, lse2, None, q, k2, v, True, 0.125, None, None, None)


def test_attention_limits_are_errors_not_fallbacks(cb, gen):
    q, k, v = rand_qkv(gen, 1, 129, 200, 2, 2, 64, torch.float16)
    with pytest.raises(NotImplementedError, match="at most 128 query rows"):
        vgkernels.attention(q, k, v, backend="cuda")
    q, k, v = rand_qkv(gen, 1, 4, 200, 2, 2, 64, torch.float32)
    with pytest.raises(TypeError, match="float16 and bfloat16"):
        vgkernels.attention(q, k, v, backend="cuda")
    q, k, v = rand_qkv(gen, 1, 4, 200, 2, 2, 256, torch.float16)
    with pytest.raises(NotImplementedError, match="head dims"):
        vgkernels.attention(q, k, v, backend="cuda")


# ---------------------------------------------------------------------------------------
# capture_from_lse
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True], ids=["all", "keep"])
@pytest.mark.parametrize("G", [1, 4, 7, 40])
@pytest.mark.parametrize("D", [64, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_capture_from_lse(cb, gen, dtype, D, G, keep):
    B, Sk, Hkv = 3, 900, 2
    Hq = G * Hkv
    q_row = torch.randn(B, Hq, D, generator=gen).to(DEV, dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=gen).to(DEV, dtype)
    N = randint(gen, 1, 600)
    ks = torch.tensor([0, Sk - N, randint(gen, 0, Sk - N)], dtype=torch.int64, device=DEV)
    scale = 1.0 / math.sqrt(D)
    # The row's true lse over all keys, as flash-attn would return it.
    s_all = torch.einsum("bhd,bkhd->bhk", q_row.double(), k.double().repeat_interleave(G, dim=2)) * scale
    lse = torch.logsumexp(s_all, dim=-1).float()
    keep_m = (torch.rand(B, N, generator=gen) >= 0.3).to(DEV) if keep else None
    poison_allocator()
    probs = vgkernels.capture_from_lse(q_row, k, lse, ks, N, keep=keep_m, backend="cuda")
    idx = ks[:, None] + torch.arange(N, device=DEV)[None, :]
    want = torch.exp(torch.gather(s_all, 2, idx[:, None, :].expand(B, Hq, N)) - lse.double()[:, :, None])
    if keep_m is not None:
        want = want * keep_m[:, None, :]
    assert probs.shape == (B, Hq, N) and probs.dtype == torch.float32
    assert not torch.isnan(probs).any()
    torch.testing.assert_close(probs.double(), want, atol=2e-6, rtol=1e-4)
    trit = vgkernels.capture_from_lse(q_row, k, lse, ks, N, keep=keep_m, backend="triton")
    torch.testing.assert_close(probs, trit, atol=1e-5, rtol=1e-3)


# ---------------------------------------------------------------------------------------
# grounding_metrics
# ---------------------------------------------------------------------------------------


def golden_metrics(attn, mask, reference=None, eps=1e-12):
    a = attn.double()
    if reference is not None:
        a = a / reference.double()
    m = mask.double().expand_as(a)
    N = a.shape[-1]
    sa, sm = a.sum(-1), m.sum(-1)
    ah, mh = a / sa[..., None], m / sm[..., None]
    ar = ((a * m).sum(-1) / sm) / (sa / N)
    zero = torch.zeros((), dtype=torch.float64, device=a.device)
    kl = torch.where(mh > 0, mh * (torch.log(mh) - torch.log(torch.clamp(ah, min=eps))), zero).sum(-1)
    r = (ah + mh) / 2
    js = 0.5 * torch.where(ah > 0, ah * torch.log(ah / r), zero).sum(-1) + 0.5 * torch.where(
        mh > 0, mh * torch.log(mh / r), zero).sum(-1)
    bad = (sa == 0) | (sm == 0)
    return [torch.where(bad, torch.full_like(x, math.nan), x) for x in (ar, kl, js)]


@pytest.mark.parametrize("with_ref", [False, True], ids=["plain", "ref"])
@pytest.mark.parametrize("N", [1, 7, 576, 4097, 16384])
@pytest.mark.parametrize("adtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grounding_metrics(cb, gen, adtype, N, with_ref):
    B, L, H = 2, 3, 5
    attn = torch.rand(B, L, H, N, generator=gen).pow(3).to(DEV, adtype)
    mask = (torch.rand(B, 1, 1, N, generator=gen) < 0.2).to(DEV)
    mask[0, 0, 0, 0] = True
    if N > 1:
        mask[1] = False  # sample 1: empty mask -> NaN rows
    attn[0, 1, 2] = 0  # one row with zero attention -> NaN
    ref = (torch.rand(B, L, 1, N, generator=gen) + 0.1).to(DEV) if with_ref else None
    poison_allocator()
    got = vgkernels.grounding_metrics(attn, mask, reference=ref, backend="cuda")
    want = golden_metrics(attn, mask, ref)
    for name, g, w in zip(("ar", "kl", "js"), got, want):
        assert g.shape == (B, L, H) and g.dtype == torch.float32, name
        assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{name}: NaN pattern"
        ok = ~torch.isnan(w)
        torch.testing.assert_close(g.double()[ok], w[ok], atol=2e-6, rtol=2e-5, msg=name)
    js = got.js[~torch.isnan(got.js)]
    assert torch.all(js >= -1e-6) and torch.all(js <= math.log(2) + 1e-6)
    trit = vgkernels.grounding_metrics(attn, mask, reference=ref, backend="triton")
    for g, t in zip(got, trit):
        torch.testing.assert_close(g, t, atol=1e-5, rtol=1e-4, equal_nan=True)


# ---------------------------------------------------------------------------------------
# compute-sanitizer
# ---------------------------------------------------------------------------------------

SANITIZER_SCRIPT = textwrap.dedent(
    """
    import math, torch, vgkernels
    from vgkernels import Capture, Knockout, _cuda_backend as cb
    g = torch.Generator().manual_seed(0)
    dev = "cuda"
    B, Sq, Sk, Hkv, G, D = 2, 19, 333, 2, 7, 80
    q = torch.randn(B, Sq, G * Hkv, D, generator=g).to(dev, torch.bfloat16)
    k = torch.randn(B, Sk, Hkv, D, generator=g).to(dev, torch.bfloat16)
    v = torch.randn(B, Sk, Hkv, D, generator=g).to(dev, torch.bfloat16)
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=dev)
    kpm = torch.ones(B, Sk, dtype=torch.bool, device=dev); kpm[1, :40] = False
    ko = Knockout(t([Sk - 10, 0]), t([Sk, Sk]), t([5, Sk - 100]), torch.rand(B, 100, generator=g).to(dev) > 0.5,
                  "zero")
    cap = Capture(t([Sk - 1, Sk - 7]), t([0, Sk - 64]), 64)
    for splits in (1, 3):
        cb.attention(q, k, v, True, 1 / math.sqrt(D), kpm, ko, cap, True, num_splits=splits)
    vgkernels.capture_from_lse(q[:, -1], k, torch.zeros(B, G * Hkv, device=dev), t([3, 0]), 300,
                               keep=torch.ones(B, 300, dtype=torch.bool, device=dev), backend="cuda")
    a = torch.rand(2, 3, 4, 1000, device=dev)
    vgkernels.grounding_metrics(a, a > 0.5, reference=a[:, :, :1] + 1, backend="cuda")
    torch.cuda.synchronize()
    print("sanitizer-script-done")
    """
)


def _sanitizer() -> str | None:
    for cand in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer",
                 os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "compute-sanitizer")):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.mark.slow
def test_compute_sanitizer_memcheck_is_clean(cb, tmp_path):
    tool = _sanitizer()
    assert tool is not None, "compute-sanitizer not found: it ships with the CUDA toolkit (set CUDA_HOME)"
    script = tmp_path / "run_kernels.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    r = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "99", sys.executable, str(script)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    assert "sanitizer-script-done" in log
    assert "ERROR SUMMARY: 0 errors" in log, log[-5000:]
