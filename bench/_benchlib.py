"""Constants and input builders shared by the benchmark files (bench/ is on sys.path under pytest)."""
from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# BENCH_SMALL=1 (``bench/run.py --small``) runs the reduced CPU shape set on a GPU too: a smoke run.
SMALL = (not CUDA) or os.environ.get("BENCH_SMALL", "0") not in ("", "0")
# bfloat16 is what the targets are stated in; the CPU run uses float32, which CPU kernels
# handle natively (its numbers are labelled CPU and say nothing about the GPU targets).
DTYPE = torch.bfloat16 if CUDA else torch.float32

INTERPRETER_SKIP = ("Triton kernels run only in the interpreter without a GPU: the interpreter is a "
                    "correctness tool, not a speed measurement")


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def available_bytes() -> int:
    """Memory a provider may still allocate: free GPU memory, or available RAM on CPU."""
    if CUDA:
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
