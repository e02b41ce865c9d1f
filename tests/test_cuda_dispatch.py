"""How ``backend="cuda"`` is reached, and what happens when the extension is absent.

Runs everywhere. Where ``vgkernels._C`` is not built (any CPU machine, this CI) every
operator asked for ``backend="cuda"`` must raise the dispatcher's RuntimeError saying how
to build it; where it is built, the backend module loads and refuses CPU tensors with a
ValueError. ``"auto"`` never resolves to the CUDA backend (the documented rule).
"""
import importlib


import pytest
import torch

import vgkernels
from vgkernels import _dispatch


def _extension_built() -> bool:
    try:
        importlib.import_module("vgkernels._C")
    except ImportError:
        return False
    return True


BUILD_MSG = r"backend='cuda' needs the compiled extension vgkernels\._C.*pip install -e \. --no-build-isolation"


def _calls():
    q = torch.randn(1, 3, 4, 64)
    k = torch.randn(1, 5, 2, 64)
    attn = torch.rand(2, 10)
    return {
        "attention": lambda: vgkernels.attention(q.half(), k.half(), k.half(), backend="cuda"),
        "capture_from_lse": lambda: vgkernels.capture_from_lse(q[:, 0], k, torch.zeros(1, 4), 0, 3, backend="cuda"),
        "grounding_metrics": lambda: vgkernels.grounding_metrics(attn, attn > 0.5, backend="cuda"),
    }


@pytest.mark.parametrize("op", ["attention", "capture_from_lse", "grounding_metrics"])
def test_cuda_backend_error_or_device_check(op):
    call = _calls()[op]
    if not _extension_built():
        with pytest.raises(RuntimeError, match=BUILD_MSG):
            call()
    else:
        with pytest.raises(ValueError, match="must be a CUDA tensor"):
            call()


def test_auto_never_picks_cuda(monkeypatch):
    for interp in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        for dev in (torch.device("cpu"), torch.device("cuda", 0)):
            assert _dispatch.resolve("auto", dev) != "cuda"
    assert _dispatch.resolve("cuda", torch.device("cpu")) == "cuda"


def test_backend_module_import_error_is_an_import_error():
    """The dispatcher relies on ImportError to produce its build message."""
    if _extension_built():
        mod = importlib.import_module("vgkernels._cuda_backend")
        for name in ("attention", "capture_from_lse", "grounding_metrics"):
            assert callable(getattr(mod, name))
        assert hasattr(torch.ops.vgkernels, "decode_attention")
    else:
        with pytest.raises(ImportError, match="vgkernels._C"):
            importlib.import_module("vgkernels._cuda_backend")


@pytest.mark.cuda_ext
@pytest.mark.gpu
def test_cuda_ops_fakes_agree_with_the_kernels():
    """opcheck runs each extension op for real and through its fake (vgkernels._cuda_meta)."""
    from vgkernels import _cuda_backend  # noqa: F401  (loads the extension and its fakes)

    g = torch.Generator().manual_seed(0)
    B, Sq, Sk, Hq, Hkv, D, N = 2, 3, 70, 4, 2, 64, 9
    q = torch.randn(B, Sq, Hq, D, generator=g).cuda().half()
    k = torch.randn(B, Sk, Hkv, D, generator=g).cuda().half()
    idx = lambda *x: torch.tensor(x, device="cuda")  # noqa: E731
    keep = (torch.rand(B, N, generator=g) > 0.5).cuda()
    utils = ("test_schema", "test_faketensor")
    ops = torch.ops.vgkernels
    torch.library.opcheck(ops.decode_attention.default, (q, k, k, True, 0.125, None, idx(60, 60), idx(70, 70),
                                                         idx(3, 4), keep, 1, idx(69, 68), idx(3, 4), N, 0),
                          test_utils=utils)
    torch.library.opcheck(ops.decode_attention.default, (q, k, k, True, 0.125, None, None, None, None, None, 0,
                                                         None, None, 0, 0), test_utils=utils)
    torch.library.opcheck(ops.capture_rows.default, (q[:, 0].contiguous(), k, torch.zeros(B, Hq, device="cuda"),
                                                     idx(3, 4), N, 0.125, keep), test_utils=utils)
    attn = torch.rand(3, 5, 40, device="cuda")
    torch.library.opcheck(ops.metrics_rows.default, (attn, attn > 0.5, None, 1e-12), test_utils=utils)
