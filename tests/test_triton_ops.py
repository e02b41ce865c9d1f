"""The kernels as ``torch.library`` operators: fake implementations and ``torch.compile``.

The Triton entry points are custom ops (``torch.ops.vgkernels_triton.*``) with fake
implementations, and the CUDA extension's ops (``torch.ops.vgkernels.*``, schemas in
``csrc/bindings.cpp``) get fakes from :mod:`vgkernels._cuda_meta`. Checked here on the CPU:
``torch.library.opcheck`` on the Triton ops (run in the interpreter), a
``torch.compile(fullgraph=True)`` trace of the public API with the torch and Triton
backends, and the CUDA fakes against the schemas read from the C++ source (the extension
itself cannot be built without a CUDA build of torch).
"""
import math
import re
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vgkernels
from vgkernels import Capture, Knockout, _cuda_meta
from vgkernels.reference import attention_ref, capture_from_lse_ref, grounding_metrics_ref
from vgkernels.triton import _common, _ops

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]


def small_case(gen, B=2, Sq=3, Sk=12, Hq=4, Hkv=2, D=16, N=5):
    q = torch.randn(B, Sq, Hq, D, generator=gen).to(DEV)
    k = torch.randn(B, Sk, Hkv, D, generator=gen).to(DEV)
    v = torch.randn(B, Sk, Hkv, D, generator=gen).to(DEV)
    kpm = torch.ones(B, Sk, dtype=torch.bool, device=DEV)
    kpm[1, :2] = False
    ko = Knockout(torch.tensor([Sk - 3, Sk - 2], device=DEV), torch.tensor([Sk, Sk], device=DEV),
                  torch.tensor([2, 4], device=DEV), (torch.rand(B, N, generator=gen) > 0.5).to(DEV), "renorm")
    cap = Capture(torch.tensor([Sk - 1, Sk - 2], device=DEV), torch.tensor([2, 4], device=DEV), N)
    return q, k, v, kpm, ko, cap


@pytest.mark.parametrize("with_everything", [True, False])
def test_opcheck_triton_attention(gen, with_everything):
    q, k, v, kpm, ko, cap = small_case(gen, Sq=3 if with_everything else 20, Sk=24)
    if with_everything:
        args = (q, k, v, True, 0.25, kpm, ko.query_start, ko.query_end, ko.key_start, ko.keep, 1,
                cap.row, cap.key_start, cap.length, True)
    else:
        args = (q, k, v, False, 0.25, None, None, None, None, None, 0, None, None, 0, False)
    torch.library.opcheck(_ops.attention, args, test_utils=("test_schema", "test_faketensor"))


def test_opcheck_triton_capture_and_metrics(gen):
    q, k, *_ = small_case(gen)
    lse = torch.randn(2, 4, generator=gen).to(DEV) + 3
    torch.library.opcheck(_ops.capture_from_lse, (q[:, 0], k, lse, torch.tensor([1, 3], device=DEV), 6, 0.25,
                                                  None), test_utils=("test_schema", "test_faketensor"))
    attn = torch.rand(3, 4, 50, generator=gen).to(DEV)
    mask = (torch.rand(3, 1, 50, generator=gen) < 0.3).to(DEV)
    for head_mean in (False, True):
        torch.library.opcheck(_ops.grounding_metrics, (attn, mask, None, 1e-12, head_mean, 0),
                              test_utils=("test_schema", "test_faketensor"))


def test_fake_tensors_give_the_kernel_shapes(gen):
    q, k, v, kpm, ko, cap = small_case(gen)
    with FakeTensorMode() as mode:
        fq, fk, fv, fkpm = (mode.from_tensor(t) for t in (q, k, v, kpm))
        fko = Knockout(*(mode.from_tensor(t) for t in ko[:4]), ko.mode)
        fcap = Capture(mode.from_tensor(cap.row), mode.from_tensor(cap.key_start), cap.length)
        out, lse, probs = vgkernels.triton.attention(fq, fk, fv, True, 0.25, fkpm, fko, fcap, True)
        out2, lse2, probs2 = vgkernels.triton.attention(fq, fk, fv, True, 0.25, None, None, None, False)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 4, 3) and lse.dtype == torch.float32
    assert probs.shape == (2, 4, 5) and probs.dtype == torch.float32
    assert out2.shape == q.shape and lse2 is None and probs2 is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_public_attention(gen, backend):
    """One graph, no break: validation asserts on the device while tracing, the backend is
    an op (Triton) or plain torch code (reference)."""
    q, k, v, kpm, ko, cap = small_case(gen)

    def f(q, k, v, kpm, qs, qe, ks, keep, row):
        res = vgkernels.attention(q, k, v, key_padding_mask=kpm, knockout=Knockout(qs, qe, ks, keep),
                                  capture=Capture(row, ks, 5), backend=backend)
        return res.out * 2, res.lse, res.probs.sum(-1)

    args = (q, k, v, kpm, ko.query_start, ko.query_end, ko.key_start, ko.keep, cap.row)
    want = f(*args)  # eager first: also imports the backend, which a traced call cannot do
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    gold = attention_ref(q, k, v, True, 1 / math.sqrt(16), kpm, ko, cap, True)
    torch.testing.assert_close(got[0], gold[0] * 2, atol=1e-5, rtol=1e-5)


def test_compiled_call_still_rejects_a_bad_span(gen):
    q, k, v, kpm, ko, cap = small_case(gen)

    def f(q, k, v, ks):
        return vgkernels.attention(q, k, v, capture=Capture(cap.row, ks, 5), backend="torch").probs

    f(q, k, v, cap.key_start)
    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    g(q, k, v, cap.key_start)
    with pytest.raises(RuntimeError, match=r"capture.key_start: the span \[key_start, key_start \+ 5\)"):
        g(q, k, v, torch.tensor([2, 9], device=DEV))


def test_compile_metrics_and_capture_from_lse(gen):
    attn = torch.rand(2, 3, 40, generator=gen).to(DEV)
    mask = (torch.rand(2, 1, 40, generator=gen) < 0.3).to(DEV)
    mask[:, :, 0] = True
    q, k, *_ = small_case(gen)
    lse = torch.randn(2, 4, generator=gen).to(DEV) + 3

    def f(attn, mask, q_row, k, lse):
        m = vgkernels.grounding_metrics(attn, mask, backend="triton")
        p = vgkernels.capture_from_lse(q_row, k, lse, torch.tensor([1, 3], device=q_row.device), 6, backend="triton")
        return m.ar, m.kl, m.js, p

    want = f(attn, mask, q[:, 0], k, lse)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(attn, mask, q[:, 0], k, lse)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True)
    ref = grounding_metrics_ref(attn, mask)
    torch.testing.assert_close(got[0], ref.ar, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[3], capture_from_lse_ref(q[:, 0], k, lse, torch.tensor([1, 3], device=DEV), 6,
                                                            0.25), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- CUDA ops' fakes

def _bindings_schemas() -> dict:
    """{op name: schema} from the m.def(...) calls of csrc/bindings.cpp."""
    src = (ROOT / "csrc" / "bindings.cpp").read_text()
    block = src[src.index("TORCH_LIBRARY(vgkernels, m)"):]
    block = block[: block.index("\n}")]
    out = {}
    for call in re.findall(r"m\.def\((.*?)\);", block, flags=re.S):
        schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call))
        out[schema.split("(")[0]] = schema
    return out


@pytest.fixture(scope="module")
def cuda_ops_on_cpu():
    """The extension's schemas under a scratch namespace, with the fakes of _cuda_meta."""
    ns = "vgkernels_fakecheck"
    lib = torch.library.Library(ns, "DEF")
    schemas = _bindings_schemas()
    assert set(schemas) == set(_cuda_meta.OPS)
    for schema in schemas.values():
        lib.define(schema)
    _cuda_meta.register(ns)
    yield getattr(torch.ops, ns)
    lib._destroy()


def test_cuda_op_fakes_match_the_reference_shapes(gen, cuda_ops_on_cpu):
    ops = cuda_ops_on_cpu
    q, k, v, kpm, ko, cap = small_case(gen)
    want = attention_ref(q, k, v, True, 0.25, kpm, ko, cap, True)
    q_row, lse_row, attn, box = q[:, 0], want[1][:, :, 0], torch.rand(2, 3, 7, 40), torch.ones(40, dtype=torch.bool)
    with FakeTensorMode() as mode:
        f = mode.from_tensor
        out, lse, probs = ops.decode_attention(f(q), f(k), f(v), True, 0.25, f(kpm), f(ko.query_start),
                                               f(ko.query_end), f(ko.key_start), f(ko.keep), 1, f(cap.row),
                                               f(cap.key_start), cap.length, 0)
        _, _, no_probs = ops.decode_attention(f(q), f(k), f(v), True, 0.25, None, None, None, None, None, 0,
                                              None, None, 0, 0)
        p = ops.capture_rows(f(q_row), f(k), f(lse_row), f(cap.key_start), 5, 0.25, None)
        ar, kl, js = ops.metrics_rows(f(attn), f(box), None, 1e-12)
    for got, ref in ((out, want[0]), (lse, want[1]), (probs, want[2])):
        assert got.shape == ref.shape and got.dtype == ref.dtype
    assert no_probs.shape == (0, 0, 0)
    assert p.shape == (2, 4, 5) and p.dtype == torch.float32
    assert ar.shape == kl.shape == js.shape == (2, 3, 7) and ar.dtype == torch.float32


def test_triton_op_fake_agrees_with_the_run(gen):
    """The fake's shapes and dtypes are the real launch's, for every output combination."""
    q, k, v, kpm, ko, cap = small_case(gen, Sq=5)
    for need_lse, with_cap, dtype in ((True, True, torch.float32), (False, False, torch.float16),
                                      (False, True, torch.float64)):
        qd, kd, vd = (t.to(dtype) for t in (q, k, v))
        c = (cap.row, cap.key_start, cap.length) if with_cap else (None, None, 0)
        args = (qd, kd, vd, True, 0.25, None, None, None, None, None, 0, *c, need_lse)
        real = _ops.attention(*args)
        with FakeTensorMode() as mode:
            fake = _ops.attention(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.dtype == f.dtype, (need_lse, with_cap, dtype)
    assert _common.INTERPRET or DEV == "cuda"
