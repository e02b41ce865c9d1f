"""Shared test setup.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
before any kernel module is imported: this file runs first, so it sets
``TRITON_INTERPRET=1`` here. Tests marked ``gpu`` skip with that reason on CPU-only
machines; nothing else is ever skipped.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if not HAS_CUDA and ("gpu" in item.keywords or "cuda_ext" in item.keywords):
            item.add_marker(skip_gpu)


@pytest.fixture
def gen(request):
    """A fresh, reported seed per test: new random data every run, reproducible from the log."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def pytest_report_header(config):
    try:
        import transformers

        tf = f"transformers {transformers.__version__} ({os.path.dirname(transformers.__file__)})"
    except ImportError:
        tf = "transformers not installed"
    return [f"torch {torch.__version__}, cuda available: {HAS_CUDA}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}", tf]
