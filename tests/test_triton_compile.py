"""The kernels compile for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter runs the kernels' Python, not Triton's compiler: a construct the compiler
rejects (a dot shape below the MMA minimum, a type mismatch between the branches of a
runtime ``if``, a loop-carried value changing dtype) would pass every interpreter test and
fail on the first GPU. Triton's wheel ships ``ptxas``, so this test compiles each kernel
ahead of time to a cubin for an A100 and an H100 target, in a subprocess where the
interpreter is off (``triton.jit`` returns interpreter objects once it is on).
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# (dtype, head dim, (CAUSAL, HAS_KPM, HAS_KO, KO_ZERO, HAS_CAP), (BLOCK_M, BLOCK_N, warps, stages))
ATTN_CASES = [
    ("bf16", 128, (True, True, True, False, True), (128, 64, 8, 3)),
    ("fp16", 80, (False, True, True, True, True), (64, 32, 4, 4)),
    ("fp16", 256, (True, False, False, False, False), (32, 32, 4, 2)),
    ("bf16", 64, (True, False, True, True, True), (16, 64, 4, 3)),  # decode-sized query tile
]
ARCHS = [80, 90]


def _compile_all() -> dict:
    """Runs in the subprocess: compile every case, return {case: shared memory bytes}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vgkernels.triton import capture, flash, metrics

    def source(fn, ptrs, consts, floats=()):
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in ptrs:
                sig[name] = ptrs[name]
            elif name in floats:
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        # What the launcher would specialise on aligned tensors and strides.
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
                 if n in ptrs or n.startswith("stride_")}
        return ASTSource(fn, sig, constexprs=consts, attrs=attrs)

    done = {}
    for arch in ARCHS:
        target = GPUTarget("cuda", arch, 32)
        for dt, D, (causal, kpm, ko, zero, cap), (bm, bn, w, st) in ATTN_CASES:
            ptrs = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "O": f"*{dt}", "LSE": "*fp32", "KPM": "*u8",
                    "KO_QS": "*i64", "KO_QE": "*i64", "KO_KS": "*i64", "KEEP": "*u8", "CAP_ROW": "*i64",
                    "CAP_KS": "*i64", "PROBS": "*fp32"}
            consts = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=bm, BLOCK_N=bn,
                          CAUSAL=causal, HAS_KPM=kpm, HAS_KO=ko, KO_ZERO=zero, HAS_CAP=cap, NEED_LSE=True,
                          UPCAST=False, DOT_PREC="tf32")
            k = triton.compile(source(flash._attn_fwd_kernel, ptrs, consts, ("qk_scale",)), target=target,
                               options={"num_warps": w, "num_stages": st})
            done[f"attn-sm{arch}-{dt}-D{D}-{bm}x{bn}"] = k.metadata.shared
        ptrs = {"QROW": "*bf16", "K": "*bf16", "LSE": "*fp32", "KS": "*i64", "KEEP": "*u8", "PROBS": "*fp32"}
        consts = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_N=128, HAS_KEEP=True)
        k = triton.compile(source(capture._capture_from_lse_kernel, ptrs, consts, ("qk_scale",)), target=target,
                           options={"num_warps": 4})
        done[f"capture-sm{arch}"] = k.metadata.shared
        for single, head_mean in ((True, False), (False, True)):
            ptrs = {"A": "*fp32", "M": "*u8", "R": "*fp32", "AR": "*fp32", "KL": "*fp32", "JS": "*fp32"}
            consts = dict(HAS_REF=True, HEAD_MEAN=head_mean, SINGLE=single, BLOCK_R=4, BLOCK_N=1024)
            k = triton.compile(source(metrics._metrics_kernel, ptrs, consts, ("inv_h", "eps")), target=target,
                               options={"num_warps": 8})
            done[f"metrics-sm{arch}-single{single}-headmean{head_mean}"] = k.metadata.shared
    return done


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"compilation failed:\n{proc.stderr[-4000:]}"
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = len(ARCHS) * (len(ATTN_CASES) + 3)
    assert len(done) == expected, done
    # Every tile fits in an H100's / A100's shared memory (228 / 164 KiB per block).
    for name, smem in done.items():
        assert 0 <= smem <= (164 if "sm80" in name else 228) * 1024, (name, smem)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    print(json.dumps(_compile_all()))
