"""Backend selection, and importing the package without optional pieces."""
import subprocess
import sys

import pytest
import torch

import vgkernels as vg
from vgkernels import _dispatch


def test_auto_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _dispatch.resolve("auto", cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.resolve("auto", cpu) == "triton"
    assert _dispatch.resolve("auto", torch.device("cuda", 0)) == "triton"
    for name in ("torch", "triton", "cuda"):
        assert _dispatch.resolve(name, cpu) == name


def test_triton_without_gpu_or_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 2, 16)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1"):
        vg.attention(q, q, q, backend="triton")


def test_cuda_backend_without_extension_says_how_to_build(monkeypatch):
    # Hide the extension whether or not this machine built it.
    monkeypatch.setitem(sys.modules, "vgkernels._C", None)
    monkeypatch.delitem(sys.modules, "vgkernels._cuda_backend", raising=False)
    monkeypatch.setattr(_dispatch, "_LOADED", {})
    q = torch.randn(1, 2, 2, 16)
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs the compiled extension vgkernels._C.*pip install"):
        vg.attention(q, q, q, backend="cuda")


def test_import_needs_no_transformers_gpu_or_extension():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('transformers', 'flash_attn') or name == 'vgkernels._C':\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import vgkernels, torch\n"
        "q = torch.randn(1, 3, 2, 8)\n"
        "print(vgkernels.attention(q, q, q, backend='torch').shape)\n"
        "assert 'transformers' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 3, 2, 8])" in r.stdout


def test_quickstart_runs(capsys):
    from vgkernels.cli import main

    assert main(["quickstart", "--backend", "torch", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "knockout: max prob on dropped tokens 0.0e+00" in out
    assert "triage: keep" in out
