"""Backend selection.

A backend is a module exposing the kernel-level functions with already-validated
arguments (the signatures of :mod:`vgkernels.reference`, without the ``_ref``):

- ``attention(q, k, v, causal, scale, key_padding_mask, knockout, capture, need_lse)``
  ``-> (out, lse | None, probs | None)``
- ``capture_from_lse(q_row, k, lse_row, key_start, length, scale, keep) -> probs``
- ``grounding_metrics(attn, mask, reference, eps) -> GroundingMetrics``

``"auto"`` is Triton for CUDA tensors, Triton on the CPU when the Triton interpreter is
switched on (``TRITON_INTERPRET=1``), and the torch reference otherwise. Short-query calls
(``Sq <= 16``: decode steps, capture rows) stay on Triton, whose split-KV kernel handles
them; ``"auto"`` never picks the CUDA extension. A backend that cannot run raises;
nothing ever falls back silently to another one.

Backend functions receive validated arguments and never synchronise with the host: the
model patch validates once per prefill and calls them per layer.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")

_MODULES = {
    "torch": "vgkernels._torch_backend",
    "triton": "vgkernels.triton",
    "cuda": "vgkernels._cuda_backend",
}


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend name ``"auto"`` stands for on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" or triton_interpreter_on():
        return "triton"
    return "torch"


def get(backend: str, device: torch.device, op: str) -> ModuleType:
    """The module implementing ``op`` for ``backend`` on ``device``, or a clear error."""
    name = resolve(backend, device)
    if name == "triton" and device.type != "cuda" and not triton_interpreter_on():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before vgkernels.triton is "
            f"imported to run the kernels on the CPU; got tensors on {device}"
        )
    mod = _LOADED.get(name)
    if mod is None:
        mod = _load(name)
    fn = getattr(mod, op, None)
    if fn is None:
        raise NotImplementedError(f"backend={name!r} does not implement {op!r}")
    return mod


_LOADED: dict = {}


def _load(name: str) -> ModuleType:
    """Import a backend once (later calls find it in ``_LOADED``, which ``torch.compile``
    can trace; an import inside a traced function cannot be: call a backend once before
    compiling a function with ``fullgraph=True``)."""
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as e:
        if name == "cuda":
            raise RuntimeError(
                "backend='cuda' needs the compiled extension vgkernels._C, which is not built "
                f"({e}). Build it on a machine with a CUDA build of torch and nvcc: "
                "`pip install -e . --no-build-isolation` (VGKERNELS_CUDA_ARCHS='80;90' picks the GPUs)."
            ) from e
        raise NotImplementedError(f"backend={name!r} is not available: {e}") from e
    _LOADED[name] = mod
    return mod
