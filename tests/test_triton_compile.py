"""The kernels compile for real GPUs (sm_80, sm_90) on a machine without one, and stay out
of local memory.

The interpreter runs the kernels' Python, not Triton's compiler: a construct the compiler
rejects (a dot shape below the MMA minimum, a type mismatch between the branches of a
runtime ``if``, a loop-carried value changing dtype, a pass that asserts on a reduction
pattern) would pass every interpreter test and fail on the first GPU. Triton's wheel ships
``ptxas``, so this test compiles each kernel ahead of time to a cubin for an A100 and an
H100 target, in subprocesses where the interpreter is off (``triton.jit`` returns
interpreter objects once it is on), and reads registers, spills and shared memory from
ptxas (:mod:`vgkernels.triton._compile`). On sm_90 the fused and split kernels also
compile with tensor descriptors (TMA).
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMEM = {80: 164 * 1024, 90: 227 * 1024}


def _cases(arch: int) -> list:
    """(name, kind, args, must_not_spill) for one architecture."""
    from vgkernels.triton import tiles

    cls = f"sm{arch}"
    out = []
    for kernel in ("attn", "attn_split"):
        for ko in (True, False):
            default = tiles.Tile(*tiles.TABLE[f"{kernel}/{cls}/d128/16bit/{'ko' if ko else 'plain'}"][0])
            out.append((f"{kernel}-d128-bf16-{'ko' if ko else 'plain'}-default", "attn",
                        dict(kernel=kernel, D=128, dtype="bf16", knockout=ko, tile=list(default)), True))
        if arch == 90:  # the TMA path, whatever the table's default is
            t = tiles.Tile(*tiles.TABLE[f"{kernel}/{cls}/d128/16bit/ko"][0])._replace(tma=True)
            out.append((f"{kernel}-d128-bf16-ko-tma", "attn",
                        dict(kernel=kernel, D=128, dtype="bf16", knockout=True, tile=list(t)), False))
        d256 = tiles.Tile(*tiles.TABLE[f"{kernel}/{cls}/d256/16bit/ko"][0])
        out.append((f"{kernel}-d256-fp16-ko-default", "attn",
                    dict(kernel=kernel, D=256, dtype="fp16", knockout=True, tile=list(d256)), True))
    out += [
        ("attn-d80-fp16-zero", "attn", dict(kernel="attn", D=80, dtype="fp16", knockout=True, zero=True,
                                           tile=[64, 32, 4, 4, False]), False),
        ("attn-d64-fp32-ko", "attn", dict(kernel="attn", D=64, dtype="fp32", knockout=True,
                                         tile=list(tiles.TABLE[f"attn/{cls}/d64/fp32/ko"][0])), False),
        ("merge-d128", "merge", dict(D=128, dtype="bf16"), True),
        ("merge-d256", "merge", dict(D=256, dtype="fp16"), True),
        ("capture-d128", "capture", dict(D=128), True),
        ("capture-d256", "capture", dict(D=256), True),
        ("metrics-single-4096", "metrics", dict(single=True, block_n=4096, head_mean=False), True),
        ("metrics-loop-2048", "metrics", dict(single=False, block_n=2048, head_mean=False), True),
        ("metrics-loop-2048-headmean", "metrics", dict(single=False, block_n=2048, head_mean=True), True),
    ]
    return out


def _compile_arch(arch: int) -> dict:
    """Runs in a subprocess: compile every case for ``arch``, return {name: statistics}."""
    from vgkernels.triton import capture, metrics
    from vgkernels.triton._compile import attention_stats, compile_stats, merge_stats

    done = {}
    for name, kind, a, _ in _cases(arch):
        if kind == "attn":
            s = attention_stats(a["kernel"], arch, a["D"], a["dtype"], a["knockout"], tuple(a["tile"]),
                                zero=a.get("zero", False))
        elif kind == "merge":
            s = merge_stats(arch, a["D"], a["dtype"])
        elif kind == "capture":
            ptrs = {"QROW": "*bf16", "K": "*bf16", "LSE": "*fp32", "KS": "*i64", "KEEP": "*u8", "PROBS": "*fp32"}
            consts = dict(HEAD_DIM=a["D"], BLOCK_D=a["D"], BLOCK_N=min(128, 8192 // a["D"]), HAS_KEEP=True)
            s = compile_stats(capture._capture_from_lse_kernel, ptrs, consts, arch=arch, num_warps=4,
                              floats=("qk_scale",))
        else:
            ptrs = {"A": "*fp32", "M": "*u8", "R": "*fp32", "AR": "*fp32", "KL": "*fp32", "JS": "*fp32"}
            consts = dict(HAS_REF=True, HEAD_MEAN=a["head_mean"], SINGLE=a["single"], BLOCK_R=1,
                          BLOCK_N=a["block_n"])
            s = compile_stats(metrics._metrics_kernel, ptrs, consts, arch=arch, num_warps=8,
                              floats=("inv_h", "eps"))
        done[name] = s
    return done


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    procs = {arch: subprocess.Popen([sys.executable, __file__, str(arch)], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for arch in (80, 90)}
    sys.path.insert(0, ROOT)
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, f"sm_{arch} compilation failed:\n{err[-4000:]}"
        done = json.loads(out.strip().splitlines()[-1])
        print(f"sm_{arch}:", json.dumps(done, indent=1))
        cases = {name: strict for name, _, _, strict in _cases(arch)}
        assert set(done) == set(cases)
        for name, s in done.items():
            # Every tile fits in an A100's / H100's shared memory per block.
            assert 0 <= s["shared"] <= SMEM[arch], (arch, name, s)
            if cases[name]:
                assert s["spill_stores"] == 0 and s["spill_loads"] == 0, (arch, name, s)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    print(json.dumps(_compile_arch(int(sys.argv[1]))))
