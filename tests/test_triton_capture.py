"""``capture_from_lse`` on Triton: one row rebuilt from an external log-sum-exp.

Golden: ``exp(scale · q·k_j − lse)`` in float64, written here. The lse comes from random
values, from the fused kernel itself, and from SDPA's own logsumexp (the path for layers
that stay on SDPA), so the three agree with the row the softmax really applied.
"""
import math

import pytest
import torch

import vgkernels
from vgkernels import Capture
from vgkernels._validate import check_capture_from_lse
from vgkernels.triton import _common
from vgkernels.triton import capture as cap_mod

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def golden(q_row, k, lse_row, key_start, length, scale=None, keep=None):
    B, Hq, D = q_row.shape
    G = Hq // k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(B, Hq, length, dtype=torch.float64)
    for b in range(B):
        ks = int(key_start[b])
        for h in range(Hq):
            keys = k[b, ks:ks + length, h // G].double().cpu()  # (length, D)
            s = keys @ q_row[b, h].double().cpu() * scale
            p = torch.exp(s - float(lse_row[b, h]))
            if keep is not None:
                p = p * keep[b].cpu().double()
            out[b, h] = p
    return out


def run(q_row, k, lse_row, key_start, length, scale=None, keep=None):
    a = check_capture_from_lse(q_row, k, lse_row, key_start, length, scale, keep)
    return cap_mod.capture_from_lse(a.q_row, a.k, a.lse_row, a.key_start, a.length, a.scale, a.keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B,Hq,Hkv,D,Sk,N",
    [(1, 1, 1, 64, 1, 1), (2, 4, 1, 64, 97, 30), (3, 7, 1, 80, 40, 40), (2, 8, 2, 128, 600, 577)],
)
@pytest.mark.parametrize("with_keep", [False, True])
def test_matches_golden(gen, dtype, B, Hq, Hkv, D, Sk, N, with_keep):
    q_row = torch.randn(B, Hq, D, generator=gen).to(DEV, dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=gen).to(DEV, dtype)
    lse = (torch.randn(B, Hq, generator=gen) * 2 + 4).to(DEV)
    key_start = torch.randint(0, Sk - N + 1, (B,), generator=gen)
    keep = (torch.rand(B, N, generator=gen) > 0.4).to(DEV) if with_keep else None
    got = run(q_row, k, lse, key_start, N, keep=keep)
    assert got.dtype == torch.float32 and got.shape == (B, Hq, N)
    want = golden(q_row, k, lse, key_start, N, keep=keep)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=1e-7)


def test_strided_inputs_float64_lse_and_scale(gen):
    # q_row sliced out of a (B, S, Hq, D) tensor and lse out of a (B, Hq, S) one, as callers do.
    q = torch.randn(2, 5, 4, 64, generator=gen).to(DEV)
    k = torch.randn(2, 30, 2, 64, generator=gen).to(DEV)
    lse = (torch.randn(2, 4, 5, generator=gen) + 3).double().to(DEV)
    q_row, lse_row = q[:, -1], lse[:, :, -1]
    assert not q_row.is_contiguous() and not lse_row.is_contiguous()
    got = run(q_row, k, lse_row, torch.tensor([0, 13]), 17, scale=0.2)
    want = golden(q_row, k, lse_row, torch.tensor([0, 13]), 17, scale=0.2)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("mode", [None, "renorm"])
def test_rebuilds_the_fused_kernels_row(gen, mode):
    """The lse the fused kernel returns, fed back, reproduces its own captured row."""
    B, Sq, Sk, Hq, Hkv, D, N = 2, 9, 50, 4, 2, 64, 20
    q = torch.randn(B, Sq, Hq, D, generator=gen).to(DEV)
    k = torch.randn(B, Sk, Hkv, D, generator=gen).to(DEV)
    v = torch.randn(B, Sk, Hkv, D, generator=gen).to(DEV)
    ks = torch.tensor([5, 28])
    keep = (torch.rand(B, N, generator=gen) > 0.5).to(DEV)
    ko = None if mode is None else vgkernels.Knockout(torch.tensor([0, 0]), torch.tensor([Sk, Sk]), ks, keep, mode)
    res = vgkernels.attention(q, k, v, knockout=ko, capture=Capture(torch.tensor([Sk - 1] * B), ks, N),
                              backend="triton")
    rebuilt = vgkernels.capture_from_lse(q[:, -1], k, res.lse[:, :, -1], ks, N,
                                         keep=None if ko is None else keep, backend="triton")
    torch.testing.assert_close(rebuilt, res.probs, rtol=1e-5, atol=1e-7)


def test_from_sdpa_logsumexp_cpu(gen):
    """SDPA's logsumexp (natural log, of the scaled scores) gives the softmax row exactly."""
    B, S, H, D, N = 2, 40, 4, 64, 25
    q = torch.randn(B, H, S, D, generator=gen)
    k = torch.randn(B, H, S, D, generator=gen)
    v = torch.randn(B, H, S, D, generator=gen)
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
    ks = torch.tensor([3, 10])
    got = vgkernels.capture_from_lse(q[:, :, -1].to(DEV), k.transpose(1, 2).to(DEV), lse[:, :, -1].to(DEV), ks, N,
                                     backend="triton").cpu()
    scores = (q[:, :, -1:] @ k.transpose(-1, -2)).squeeze(2).double() / math.sqrt(D)
    soft = torch.softmax(scores, dim=-1)
    want = torch.stack([soft[b, :, int(ks[b]):int(ks[b]) + N] for b in range(B)])
    torch.testing.assert_close(got.double(), want, rtol=3e-5, atol=1e-7)


def test_public_api_reaches_the_kernel(gen, monkeypatch):
    import vgkernels.triton as vt

    calls = []
    real = vt.capture_from_lse
    monkeypatch.setattr(vt, "capture_from_lse", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q_row = torch.randn(1, 2, 64, generator=gen).to(DEV)
    k = torch.randn(1, 10, 1, 64, generator=gen).to(DEV)
    lse = torch.full((1, 2), 3.0, device=DEV)
    want = golden(q_row, k, lse, [2], 5)
    backends = ["triton"] + (["auto"] if (DEV == "cuda" or _common.INTERPRET) else [])
    for backend in backends:
        got = vgkernels.capture_from_lse(q_row, k, lse, 2, 5, backend=backend)
        torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=1e-7)
    assert len(calls) == len(backends)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_from_flash_sdpa_logsumexp(gen, dtype):
    B, S, Hq, Hkv, D, N = 16, 2900, 28, 4, 128, 576
    q = torch.randn(B, S, Hq, D, generator=gen).to(DEV, dtype)
    k = torch.randn(B, S, Hkv, D, generator=gen).to(DEV, dtype)
    v = torch.randn(B, S, Hkv, D, generator=gen).to(DEV, dtype)
    G = Hq // Hkv
    kr = k.repeat_interleave(G, dim=2).transpose(1, 2)
    vr = v.repeat_interleave(G, dim=2).transpose(1, 2)
    lse = torch.ops.aten._scaled_dot_product_flash_attention(q.transpose(1, 2), kr, vr, 0.0, True)[1]
    ks = torch.full((B,), 40)
    got = vgkernels.capture_from_lse(q[:, -1], k, lse[:, :, -1], ks, N, backend="triton")
    want = golden(q[:, -1], k, lse[:, :, -1], ks, N)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-3, atol=1e-6)
