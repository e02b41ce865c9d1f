"""Helpers shared by the Triton kernels: interpreter detection, output allocation, dtypes."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, at import: the Triton interpreter is switched on or off for the whole
# process before any kernel is traced, and the kernels specialise on it.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# The interpreter's tl.dot multiplies the raw uint16 bits of bfloat16 operands (it
# stores bf16 as uint16 in numpy), so under the interpreter every dot operand is
# upcast to float32 first. On a GPU the operands keep their dtype (tensor cores).
UPCAST_DOT = INTERPRET

# Tests set this to True (monkeypatch) so that every output buffer starts as NaN / a
# sentinel, and an element that a kernel forgot to write fails the comparison.
POISON = False


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs, poisoned when :data:`POISON` is set."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        if dtype.is_floating_point:
            t.fill_(float("nan"))
        else:
            t.fill_(-7)
    return t


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def as_loadable(t: torch.Tensor) -> torch.Tensor:
    """Triton loads bool pointers as int1 of undefined width on some paths; a uint8 view
    (same bytes, same strides, no copy) is unambiguous."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


_DUMMIES: dict = {}


def dummy(device, dtype=torch.int64) -> torch.Tensor:
    """A valid pointer for arguments a specialisation never dereferences (cached, so a
    launch does not pay an allocation and a fill kernel per unused argument)."""
    key = (str(torch.device(device)), dtype)
    t = _DUMMIES.get(key)
    if t is None:
        t = _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return t


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
