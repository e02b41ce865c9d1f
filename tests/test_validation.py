"""Every bad input of SPEC §2 raises, naming the argument and the expected shape."""
import pytest
import torch

import vgkernels as vg


def qkv(B=2, Sq=3, Sk=8, Hq=4, Hkv=2, D=16, dtype=torch.float32):
    return (torch.randn(B, Sq, Hq, D, dtype=dtype), torch.randn(B, Sk, Hkv, D, dtype=dtype),
            torch.randn(B, Sk, Hkv, D, dtype=dtype))


def ko(keep=None, qs=(5, 5), qe=(8, 8), ks=(1, 1), mode="renorm"):
    keep = torch.ones(2, 3, dtype=torch.bool) if keep is None else keep
    return vg.Knockout(torch.tensor(qs), torch.tensor(qe), torch.tensor(ks), keep, mode)


CASES = [
    ("q 3-D", lambda q, k, v: dict(q=q[0]), ValueError, r"q: expected shape \(B, Sq, Hq, D\), got \(3, 4, 16\)"),
    ("batch", lambda q, k, v: dict(k=k[:1], v=v[:1]), ValueError, r"k: expected batch 2 .* got \(1, 8, 2, 16\)"),
    ("head dim", lambda q, k, v: dict(k=k[..., :8], v=v[..., :8]), ValueError, r"k: expected head dim 16"),
    ("k vs v", lambda q, k, v: dict(v=v[:, :5]), ValueError, r"v: expected the shape of k \(2, 8, 2, 16\), got \(2, 5, 2, 16\)"),
    ("gqa", lambda q, k, v: dict(k=torch.randn(2, 8, 3, 16), v=torch.randn(2, 8, 3, 16)), ValueError,
     r"Hq=4 must be a multiple of Hkv=3"),
    ("sq > sk", lambda q, k, v: dict(q=torch.randn(2, 9, 4, 16)), ValueError, r"Sq=9 exceeds Sk=8"),
    ("mixed dtypes", lambda q, k, v: dict(k=k.half()), TypeError, r"expected one dtype, got q torch.float32, k torch.float16"),
    ("int dtype", lambda q, k, v: dict(q=q.int(), k=k.int(), v=v.int()), TypeError, r"q: expected float16"),
    ("last dim strided", lambda q, k, v: dict(q=torch.randn(2, 3, 4, 32)[..., ::2]), ValueError,
     r"q: the last \(head\) dimension must be contiguous"),
    ("kpm shape", lambda q, k, v: dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError,
     r"key_padding_mask: expected shape \(2, 8\), got \(2, 7\)"),
    ("kpm dtype", lambda q, k, v: dict(key_padding_mask=torch.ones(2, 8)), TypeError, r"key_padding_mask: expected dtype torch.bool"),
    ("keep shape", lambda q, k, v: dict(knockout=ko(keep=torch.ones(3, 3, dtype=torch.bool))), ValueError,
     r"knockout.keep: expected shape \(2, N\) bool, got \(3, 3\)"),
    ("keep dtype", lambda q, k, v: dict(knockout=ko(keep=torch.ones(2, 3))), TypeError, r"knockout.keep: expected dtype torch.bool"),
    ("ko span past end", lambda q, k, v: dict(knockout=ko(ks=(1, 6))), ValueError,
     r"knockout.key_start: the span \[key_start, key_start \+ 3\) must lie inside \[0, Sk=8\); got key_start=\[1, 6\]"),
    ("ko span negative", lambda q, k, v: dict(knockout=ko(ks=(-1, 0))), ValueError, r"knockout.key_start: the span"),
    ("ko rows", lambda q, k, v: dict(knockout=ko(qs=(6, 5), qe=(5, 9))), ValueError,
     r"knockout.query_start/query_end: expected 0 <= query_start <= query_end <= Sk=8"),
    ("ko vector shape", lambda q, k, v: dict(knockout=ko(qs=(1, 2, 3))), ValueError,
     r"knockout.query_start: expected shape \(2,\)"),
    ("ko float vector", lambda q, k, v: dict(knockout=vg.Knockout(torch.tensor([5.0, 5.0]), torch.tensor([8, 8]),
                                                                 torch.tensor([1, 1]), torch.ones(2, 3, dtype=torch.bool))),
     TypeError, r"knockout.query_start: expected an integer tensor"),
    ("ko mode", lambda q, k, v: dict(knockout=ko(mode="drop")), ValueError, r"knockout.mode: expected one of"),
    ("capture row outside block", lambda q, k, v: dict(capture=vg.Capture(torch.tensor([4, 7]), torch.tensor([0, 0]), 3)),
     ValueError, r"capture.row: expected positions in this call's query block \[5, 8\) \(Sq=3, Sk=8\), got \[4, 7\]"),
    ("capture span", lambda q, k, v: dict(capture=vg.Capture(torch.tensor([7, 7]), torch.tensor([0, 6]), 3)),
     ValueError, r"capture.key_start: the span"),
    ("capture length", lambda q, k, v: dict(capture=vg.Capture(torch.tensor([7, 7]), torch.tensor([0, 0]), -1)),
     ValueError, r"capture.length: expected a non-negative int"),
    ("backend", lambda q, k, v: dict(backend="jax"), ValueError, r"backend: expected one of"),
    ("not a tensor", lambda q, k, v: dict(q=[1, 2]), TypeError, r"q: expected a torch.Tensor"),
    ("scale", lambda q, k, v: dict(softmax_scale=float("nan")), ValueError, r"softmax_scale: expected a finite float"),
]


@pytest.mark.parametrize("name,change,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_attention_rejects(name, change, exc, pattern):
    q, k, v = qkv()
    kwargs = dict(q=q, k=k, v=v, backend="torch")
    kwargs.update(change(q, k, v))
    with pytest.raises(exc, match=pattern):
        vg.attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


def test_capture_from_lse_rejects():
    q, k, _ = qkv()
    lse = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"lse_row: expected shape \(2, 4\), got \(2, 3\)"):
        vg.capture_from_lse(q[:, 0], k, torch.zeros(2, 3), torch.tensor([0, 0]), 3)
    with pytest.raises(ValueError, match=r"key_start: the span"):
        vg.capture_from_lse(q[:, 0], k, lse, torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match=r"keep: expected shape \(2, 3\) bool"):
        vg.capture_from_lse(q[:, 0], k, lse, torch.tensor([0, 0]), 3, keep=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q_row: expected shape \(B, Hq, D\)"):
        vg.capture_from_lse(q, k, lse, torch.tensor([0, 0]), 3)
    with pytest.raises(TypeError, match=r"q_row, k: expected one dtype"):
        vg.capture_from_lse(q[:, 0].half(), k, lse, torch.tensor([0, 0]), 3)


def test_metrics_rejects():
    with pytest.raises(ValueError, match=r"mask: shape \(5,\) does not broadcast against attn \(2, 4\)"):
        vg.grounding_metrics(torch.rand(2, 4), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask: shape \(3, 2, 4\) would broadcast attn \(2, 4\)"):
        vg.grounding_metrics(torch.rand(2, 4), torch.ones(3, 2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"reference: shape \(3,\) does not broadcast"):
        vg.grounding_metrics(torch.rand(2, 4), torch.ones(4), reference=torch.ones(3))
    with pytest.raises(TypeError, match=r"attn: expected a floating dtype"):
        vg.grounding_metrics(torch.ones(2, 4, dtype=torch.int64), torch.ones(4))
