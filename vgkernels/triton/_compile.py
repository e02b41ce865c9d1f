"""Ahead-of-time compilation of the Triton kernels for a GPU target, without a GPU.

Used by ``tests/test_triton_compile.py`` (every kernel variant must compile for sm_80 and
sm_90 and stay out of local memory) and by ``bench/tune.py --dry-run`` (compile statistics
of every tile candidate). Triton's wheel ships ``ptxas``; with its log switched on, ptxas
reports registers, stack frame and spill bytes per kernel, which :func:`compile_stats`
parses. This module must run in a process where ``TRITON_INTERPRET`` is off (under the
interpreter ``triton.jit`` returns interpreter objects that cannot be compiled).
"""
from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
from typing import Mapping, Optional

_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def signature(fn, ptrs: Mapping[str, str], constexprs: Mapping[str, object], floats=(), i64=()) -> dict:
    """Triton signature strings for ``fn``'s parameters: ``ptrs`` maps a parameter to its
    pointer or descriptor type (``"*bf16"``, ``"tensordesc<bf16[1, 64, 1, 128]>"``), ``floats``
    are fp32 scalars, ``i64`` int64 scalars, the rest int32 scalars."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name in floats:
            sig[name] = "fp32"
        elif name in i64:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def compile_stats(fn, ptrs: Mapping[str, str], constexprs: Mapping[str, object], *, arch: int,
                  num_warps: int = 4, num_stages: int = 3, floats=(), i64=(), sass: bool = False) -> dict:
    """Compile ``fn`` for ``sm_<arch>`` and return ``{regs, stack, spill_stores, spill_loads,
    shared}`` (bytes; ``sass_lines`` too when ``sass``). Pointers and ``stride_*`` arguments
    are specialised as 16-byte aligned, as the launcher does for aligned tensors."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = signature(fn, ptrs, constexprs, floats, i64)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if (n in ptrs and ptrs[n].startswith("*")) or n.startswith("stride_")}
    src = ASTSource(fn, sig, constexprs=dict(constexprs), attrs=attrs)
    buf = io.StringIO()
    # A cache hit skips ptxas and its log: compile afresh.
    old = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = True
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": num_warps, "num_stages": num_stages})
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    log = buf.getvalue()
    regs = _PTXAS.findall(log)
    spill = _SPILL.findall(log)
    if not regs or not spill:
        raise RuntimeError(f"could not read ptxas statistics for {fn.__name__}:\n{log[-2000:]}")
    stack, st, ld = (int(x) for x in spill[-1])
    out = {"regs": int(regs[-1]), "stack": stack, "spill_stores": st, "spill_loads": ld,
           "shared": int(k.metadata.shared)}
    if sass:
        out["sass_lines"] = sass_lines(k.asm["cubin"])
    return out


def sass_lines(cubin: bytes) -> Optional[int]:
    """Instruction count of a cubin (lines of ``cuobjdump -sass`` that hold an instruction)."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in text.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line))


def attention_stats(kernel: str, arch: int, D: int, dtype: str, knockout: bool, tile, *, zero: bool = False,
                    sass: bool = False) -> dict:
    """:func:`compile_stats` of one attention tile: ``kernel`` ``attn`` or ``attn_split``,
    ``dtype`` ``"bf16"``, ``"fp16"`` or ``"fp32"``. The feature set is the heaviest one of its
    table key: causal with padding, plus knockout (``zero`` mode when asked) and capture
    for ``knockout=True``, capture alone otherwise."""
    import triton

    from . import flash

    bm, bn, warps, stages, tma = tile
    bd = max(16, triton.next_power_of_2(D))
    ptr = f"*{dtype}"
    kv = f"tensordesc<{dtype}[1, {bn}, 1, {bd}]>" if tma else ptr
    common = {"KPM": "*u8", "KO_QS": "*i64", "KO_QE": "*i64", "KO_KS": "*i64", "KEEP": "*u8"}
    consts = dict(HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, HAS_KPM=True, HAS_KO=knockout,
                  KO_ZERO=zero, UPCAST=False, DOT_PREC="tf32x3" if dtype == "fp32" else "tf32", USE_TMA=bool(tma))
    if kernel == "attn":
        fn = flash._attn_fwd_kernel
        ptrs = dict(common, Q=f"tensordesc<{dtype}[1, {bm}, 1, {bd}]>" if tma else ptr, K=kv, V=kv, QP=ptr, O=ptr,
                    LSE="*fp32", CAP_ROW="*i64", CAP_KS="*i64", PROBS="*fp32")
        consts.update(HAS_CAP=True, NEED_LSE=True)
    elif kernel == "attn_split":
        fn = flash._attn_split_kernel
        ptrs = dict(common, Q=ptr, K=kv, V=kv, PO="*fp32", PL="*fp32")
    else:
        raise ValueError(f"kernel: expected 'attn' or 'attn_split', got {kernel!r}")
    return compile_stats(fn, ptrs, consts, arch=arch, num_warps=warps, num_stages=stages, floats=("qk_scale",),
                         sass=sass)


def merge_stats(arch: int, D: int, dtype: str, block_sq: int = 16) -> dict:
    """:func:`compile_stats` of the split-KV merge (with capture, knockout and padding)."""
    import triton

    from . import flash

    bd = max(16, triton.next_power_of_2(D))
    ptrs = {"PO": "*fp32", "PL": "*fp32", "O": f"*{dtype}", "LSE": "*fp32", "Q": f"*{dtype}", "K": f"*{dtype}",
            "KPM": "*u8", "KO_QS": "*i64", "KO_QE": "*i64", "KO_KS": "*i64", "KEEP": "*u8", "CAP_ROW": "*i64",
            "CAP_KS": "*i64", "PROBS": "*fp32"}
    consts = dict(HEAD_DIM=D, BLOCK_D=bd, BLOCK_SQ=block_sq, BLOCK_N=max(16, 8192 // bd), CAUSAL=True,
                  HAS_KPM=True, HAS_KO=True, HAS_CAP=True, NEED_LSE=True)
    return compile_stats(flash._attn_merge_kernel, ptrs, consts, arch=arch, num_warps=4, num_stages=2,
                         floats=("qk_scale",))
