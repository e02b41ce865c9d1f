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
