"""CI checks of the CUDA sources that need no GPU.

1. Every torch-free kernel source in ``csrc/*.cu`` compiles with nvcc for sm_80 and sm_90
   (one nvcc call per file, both architectures, files in parallel), with the flags the
   extension build adds (torch's half-operator guards), so a syntax or template error
   fails CI.
2. The binding ``csrc/bindings.cpp`` passes ``g++ -fsyntax-only`` against the installed
   torch's headers (a CPU torch lacks one generated CUDA header; a stub supplies it).
3. The launch-geometry and softmax arithmetic of ``csrc/geometry.h`` — the functions the
   kernels call — is compiled into a small host program (csrc/host_tests/) and checked
   against independent Python/numpy computations: row packing, split plans, tile ranges,
   causal limits, knockout tests, online-softmax steps and the log-sum-exp merge.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = ("80", "90")
# What torch.utils.cpp_extension adds to every nvcc call of the real build.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
]


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc",
                 os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _cuda_include() -> Path | None:
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_runtime_api.h").exists():
            return Path(base) / "include"
    nvcc = _nvcc()
    if nvcc:
        inc = Path(os.path.realpath(nvcc)).parents[1] / "include"
        if (inc / "cuda_runtime_api.h").exists():
            return inc
    return None


NVCC = _nvcc()


def needs_nvcc(fn):
    """nvcc is part of the development and CI machines (issue 7): its absence is a
    failure that says what to install, never a silent skip."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        assert NVCC is not None, "nvcc not found: install the CUDA toolkit (or set CUDA_HOME) to compile csrc/"
        return fn(*a, **kw)

    return wrapper


def _gencode() -> list[str]:
    out = []
    for a in ARCHS:
        out += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return out


def test_kernel_sources_exist():
    names = {p.name for p in KERNEL_SOURCES}
    assert {"capture.cu", "metrics.cu", "decode_attention.cu"} <= names, names
    assert (CSRC / "bindings.cpp").exists()


@needs_nvcc
def test_kernel_sources_compile_for_sm80_and_sm90(tmp_path):
    def compile_one(src: Path):
        cmd = [NVCC, "-c", str(src), "-o", str(tmp_path / (src.stem + ".o")), "-std=c++17", "-O3", "-lineinfo",
               "-I", str(CSRC), *TORCH_NVCC_FLAGS, *_gencode(), "-Xcompiler", "-Wall", "-res-usage"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return src.name, r.returncode, r.stdout + r.stderr

    with ThreadPoolExecutor(max_workers=max(1, min(len(KERNEL_SOURCES), os.cpu_count() or 1))) as ex:
        results = list(ex.map(compile_one, KERNEL_SOURCES))
    failures = [f"{name} (exit {rc}):\n{log}" for name, rc, log in results if rc != 0]
    assert not failures, "\n\n".join(failures)
    for (name, _, log), src in zip(results, KERNEL_SOURCES):
        obj = tmp_path / (src.stem + ".o")
        assert obj.exists() and obj.stat().st_size > 0, f"{obj} not written"
        # -res-usage makes ptxas report every kernel it assembled, per architecture.
        for a in ARCHS:
            assert f"for 'sm_{a}'" in log, f"{name}: no SASS for sm_{a}:\n{log[-3000:]}"


def _torch_include() -> Path:
    import torch.utils.cpp_extension as ce

    return Path(ce.include_paths()[0])


def test_bindings_compile_syntax_only(tmp_path):
    """g++ -fsyntax-only of the binding against torch's headers (no CUDA build of torch needed)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    cuda_inc = _cuda_include()
    assert cxx is not None, "g++ not found: it is needed to syntax-check csrc/bindings.cpp"
    assert cuda_inc is not None, "the CUDA toolkit headers (cuda_runtime_api.h) were not found; set CUDA_HOME"
    inc = _torch_include()
    stub = tmp_path / "stub"
    gen = inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not gen.exists():  # generated only in CUDA builds of torch; empty is what a static build has
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-unused-function", f"-I{stub}", f"-I{inc}",
           f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{cuda_inc}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}", str(CSRC / "bindings.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------
# Host checks of csrc/geometry.h
# ---------------------------------------------------------------------------------------

TILE = 64
ROWS_PER_WARP = 16
MAX_WARPS = 8
MAX_SPLITS = 128


@pytest.fixture(scope="module")
def geom(tmp_path_factory):
    """Runs commands through the compiled host driver; returns a function lines -> outputs."""
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx is not None, "a C++ compiler (g++) is needed to build the host geometry checks"
    exe = tmp_path_factory.mktemp("geom") / "geometry_check"
    src = CSRC / "host_tests" / "geometry_check.cpp"
    r = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

    def run(lines: list[str]) -> list[str]:
        p = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        out = p.stdout.splitlines()
        assert len(out) == len(lines), (len(out), len(lines))
        return out

    return run


def _f(s: str) -> float:
    return float(s)  # Python parses "-inf"


def test_row_packing_covers_every_row_once(geom):
    cases = [(sq, g) for sq in (1, 2, 7, 8, 16, 31, 32, 97, 127, 128) for g in (1, 2, 4, 5, 7, 8, 16, 32, 64)]
    out = geom([f"packing {sq} {g}" for sq, g in cases])
    for (sq, g), line in zip(cases, out):
        head, blocks = line.split("|")
        rows, mtiles, mblocks, warps = map(int, head.split())
        assert rows == sq * g
        assert mtiles == math.ceil(rows / ROWS_PER_WARP)
        assert mblocks == math.ceil(mtiles / MAX_WARPS), "as few row blocks as 8-warp blocks allow"
        assert 1 <= warps <= MAX_WARPS
        b = list(map(int, blocks.split()))
        ranges = list(zip(b[0::2], b[1::2]))
        assert len(ranges) == mblocks
        expect = 0
        for lo, hi in ranges:
            assert lo == expect and lo < hi, f"block rows not contiguous / empty: {ranges}"
            assert hi - lo <= warps * ROWS_PER_WARP
            expect = hi
        assert expect == rows


def _py_auto_splits(total, base, slots):
    if base * 5 >= slots * 4:
        return 1
    max_n = min(MAX_SPLITS, max(1, total // 2))

    def eff(n):
        blocks = base * n
        return blocks / (math.ceil(blocks / slots) * slots)

    best = max(eff(n) for n in range(1, max_n + 1))
    return next(n for n in range(1, max_n + 1) if eff(n) >= 0.85 * best)


def test_split_plan_partitions_the_key_tiles(geom):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    cases = [(1, 1, 132, 0), (64, 1, 132, 0), (65, 1, 132, 0), (4096, 128, 132, 0), (4096, 8, 132, 0),
             (4096, 8, 132, 3), (640, 2, 108, 0), (100000, 1, 132, 0), (4096, 1, 132, 1000)]
    cases += [(rng.randint(1, 20000), rng.randint(1, 300), rng.choice([1, 80, 108, 132, 264]),
               rng.choice([0, 0, 1, 2, 5, 17, 200])) for _ in range(300)]
    plans = geom([f"plan {sk} {base} {slots} {req}" for sk, base, slots, req in cases])
    tiles = geom([f"tiles {sk} {base} {slots} {req} {sk}" for sk, base, slots, req in cases])
    for (sk, base, slots, req), pl, tl in zip(cases, plans, tiles):
        total, n, tps = map(int, pl.split())
        assert total == math.ceil(sk / TILE)
        want = req if req > 0 else _py_auto_splits(total, base, slots)
        want = max(1, min(want, total, MAX_SPLITS))
        assert tps == math.ceil(total / want)
        assert n == math.ceil(total / tps) and 1 <= n <= want
        r = list(map(int, tl.split()))
        ranges = list(zip(r[0::2], r[1::2]))
        assert len(ranges) == n
        covered = []
        for lo, hi in ranges:
            assert hi > lo, f"empty split in {ranges}"
            covered += list(range(lo, hi))
        assert covered == list(range(total)), "splits must cover every tile exactly once, in order"


def test_split_tiles_stop_at_the_causal_limit(geom):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    cases = []
    for _ in range(200):
        sk = rng.randint(1, 5000)
        cases.append((sk, rng.randint(1, 50), 132, rng.choice([0, 1, 3, 9]), rng.randint(1, sk)))
    out = geom([f"tiles {sk} {base} {slots} {req} {lim}" for sk, base, slots, req, lim in cases])
    for (sk, base, slots, req, lim), line in zip(cases, out):
        r = list(map(int, line.split()))
        needed = set(range(math.ceil(lim / TILE)))
        got = set()
        for lo, hi in zip(r[0::2], r[1::2]):
            got |= set(range(lo, hi))  # empty when hi <= lo
        assert got == needed, (sk, lim, r)


def test_key_limit_is_one_past_the_last_attendable_key(geom):
    cases = [(sk, sq, i, c) for sk in (1, 5, 64, 577) for sq in (1, 3, 64) if sq <= sk
             for i in sorted({0, sq // 2, sq - 1}) for c in (0, 1)]
    out = geom([f"keylimit {sk} {sq} {i} {c}" for sk, sq, i, c in cases])
    for (sk, sq, i, c), line in zip(cases, out):
        pos = sk - sq + i
        brute = max(j for j in range(sk) if (not c) or j <= pos) + 1
        assert int(line) == brute


def test_knockout_row_and_key_tests(geom):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    lines, expect = [], []
    for _ in range(300):
        pos, a = rng.randint(0, 50), rng.randint(0, 50)
        b = rng.randint(a, 60)
        lines.append(f"affected {pos} {a} {b}")
        expect.append(int(a <= pos < b))
    for _ in range(300):
        n = rng.randint(0, 12)
        start = rng.randint(0, 20)
        keep = [rng.random() < 0.5 for _ in range(n)]
        key = rng.randint(0, 40)
        bits = "".join("1" if x else "0" for x in keep) or "-"
        lines.append(f"knocked {key} {start} {n} {bits}")
        expect.append(int(start <= key < start + n and not keep[key - start]))
    for _ in range(300):
        a0, a1, b0, b1 = (rng.randint(0, 30) for _ in range(4))
        lines.append(f"intersect {a0} {a1} {b0} {b1}")
        expect.append(int(bool(set(range(a0, a1)) & set(range(b0, b1)))))
    assert list(map(int, geom(lines))) == expect


def test_online_softmax_step(geom):
    cases = [("-inf", "-inf"), ("-inf", "3.5"), ("2", "-inf"), ("2", "5"), ("5", "2"), ("-1e3", "7")]
    out = geom([f"online {a} {b}" for a, b in cases])
    for (a, b), line in zip(cases, out):
        m_new, m_use, alpha = map(_f, line.split())
        fa, fb = float(a), float(b)
        assert m_new == max(fa, fb)
        assert m_use == (0.0 if m_new == -math.inf else m_new)
        assert not math.isnan(alpha)
        assert alpha == pytest.approx(2.0 ** (fa - m_use) if fa != -math.inf else 0.0, rel=1e-6)


def _logsumexp(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or np.all(np.isneginf(x)):
        return -math.inf
    m = x[~np.isneginf(x)].max()
    return float(m + np.log(np.exp(x - m).sum()))


def test_lse_merge_against_numpy(geom, gen):
    import torch

    rows = []
    for _ in range(200):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        x = (torch.randn(n, generator=gen, dtype=torch.float64) * 20).numpy()
        x[torch.rand(n, generator=gen).numpy() < 0.3] = -np.inf
        rows.append(x)
    rows.append(np.full(3, -np.inf))
    lines = [f"merge {len(x)} " + " ".join("-inf" if np.isneginf(v) else repr(float(np.float32(v))) for v in x)
             for x in rows]
    for x, line in zip(rows, geom(lines)):
        vals = list(map(_f, line.split()))
        tot, w = vals[0], np.array(vals[1:])
        x32 = x.astype(np.float32).astype(np.float64)
        want = _logsumexp(x32)
        if want == -math.inf:
            assert tot == -math.inf and np.all(w == 0)
            continue
        assert tot == pytest.approx(want, abs=2e-5 * max(1.0, abs(want)))
        np.testing.assert_allclose(w, np.exp(x32 - want), rtol=1e-5, atol=1e-7)
        assert w.sum() == pytest.approx(1.0, rel=1e-5)


def test_split_softmax_chain_matches_logsumexp(geom, gen):
    """Split plan + per-tile online steps + finish_lse + merge_lse, chained as the kernels do,
    give the log-sum-exp of the whole row, including rows and splits with no key."""
    import torch

    cases = []
    for sk in (1, 63, 64, 65, 200, 577, 1000):
        for req in (1, 2, 3, 7):
            x = (torch.randn(sk, generator=gen, dtype=torch.float64) * 4).numpy()
            mode = int(torch.randint(0, 4, (1,), generator=gen))
            if mode == 1:
                x[torch.rand(sk, generator=gen).numpy() < 0.7] = -np.inf
            elif mode == 2:
                x[: max(0, sk - 5)] = -np.inf  # whole leading splits empty
            elif mode == 3 and sk < 100:
                x[:] = -np.inf  # a row with no key
            cases.append((req, x))
    lines = [f"softmax {req} {len(x)} " + " ".join("-inf" if np.isneginf(v) else repr(float(np.float32(v)))
                                                   for v in x) for req, x in cases]
    for (req, x), line in zip(cases, geom(lines)):
        want = _logsumexp(x.astype(np.float32))
        got = _f(line)
        if want == -math.inf:
            assert got == -math.inf
        else:
            assert got == pytest.approx(want, abs=1e-4 * max(1.0, abs(want)))


def test_capture_and_metrics_geometry(geom):
    gs = [1, 2, 4, 7, 8, 31, 32, 33, 64, 100]
    ns = [1, 63, 64, 65, 576, 16384]
    cap = geom([f"capture {g} {n}" for g in gs for n in ns])
    it = iter(cap)
    for g in gs:
        for n in ns:
            hpb, chunks, kblocks = map(int, next(it).split())
            assert 1 <= hpb <= 32 and hpb <= g
            assert hpb * chunks >= g > hpb * (chunks - 1)
            assert kblocks * 64 >= n > (kblocks - 1) * 64
    ns2 = [0, 1, 512, 513, 2048, 2049, 16384]
    for n, line in zip(ns2, geom([f"metrics {n}" for n in ns2])):
        t = int(line)
        assert t % 32 == 0 and 32 <= t <= 256


# ---------------------------------------------------------------------------------------
# Tensor-core fragment addressing, replayed on the host
# ---------------------------------------------------------------------------------------
#
# The emulator below encodes the PTX ISA's definitions of ldmatrix.x4 (with and without
# .trans) and of the mma.m16n8k16 A/B/C fragment layouts, independently of the kernel.
# It then runs one warp's 16 x 64 tile of the attention kernel with the kernel's own
# addressing (read from geometry.h through the host driver): Q fragments loaded from
# global memory, K through ldmatrix, the score accumulators re-packed as P, V through
# ldmatrix.trans, and the output written back from the accumulators. The result must be
# Q K^T and (Q K^T) V exactly (float64, no rounding).


def _ptx_a(regs):
    """A (16 x 16) from per-lane registers regs[lane][a][e] (PTX m16n8k16 A layout)."""
    A = np.full((16, 16), np.nan)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for a in range(4):
            for e in range(2):
                A[g + 8 * (a % 2), 2 * t + e + 8 * (a // 2)] = regs[lane][a][e]
    return A


def _ptx_b(regs):
    """B (16 x 8) from per-lane registers regs[lane][b][e] (PTX m16n8k16 B layout)."""
    B = np.full((16, 8), np.nan)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for b in range(2):
            for e in range(2):
                B[2 * t + e + 8 * b, g] = regs[lane][b][e]
    return B


def _ptx_mma(acc, a_regs, b_regs):
    """acc[lane][c] += (A B)[row, col] with the PTX C layout (row g + 8(c/2), col 2t + c%2)."""
    Dm = _ptx_a(a_regs) @ _ptx_b(b_regs)
    assert not np.isnan(Dm).any()
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for c in range(4):
            acc[lane][c] += Dm[g + 8 * (c // 2), 2 * t + c % 2]


def _ptx_ldmatrix_x4(smem, row_addr, trans):
    """row_addr[lane] = (row, col) of the 8 consecutive elements lane supplies; lane 8m + r
    gives row r of matrix m, which lands in register m. Returns regs[lane][m][e]."""
    mats = []
    for m in range(4):
        rows = []
        for r in range(8):
            rr, cc = row_addr[8 * m + r]
            rows.append(smem[rr, cc: cc + 8])
        mats.append(np.array(rows))
    regs = [[[0.0, 0.0] for _ in range(4)] for _ in range(32)]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for m in range(4):
            for e in range(2):
                regs[lane][m][e] = mats[m][2 * t + e, g] if trans else mats[m][g, 2 * t + e]
    return regs


@pytest.mark.parametrize("D", [64, 80, 128])
def test_fragment_addressing_reproduces_a_warp_tile(geom, gen, D):
    import torch

    lanes = [list(map(int, chunk.split())) for chunk in geom(["frag"])[0].split(";")]
    assert len(lanes) == 32
    acc_row = [l[0:4] for l in lanes]
    acc_col = [l[4:8] for l in lanes]
    afrag_row = [l[8:12] for l in lanes]
    afrag_col = [[l[12 + 2 * a: 14 + 2 * a] for a in range(4)] for l in lanes]
    k_key, k_dim, v_key, v_dim = ([l[20 + i] for l in lanes] for i in range(4))
    pm = list(map(int, geom(["pmap"])[0].split()))
    p_ntile = [pm[4 * kk: 4 * kk + 4] for kk in range(4)]
    p_elem = [pm[16 + 2 * a: 18 + 2 * a] for a in range(4)]

    Q = torch.randn(16, D, generator=gen, dtype=torch.float64).numpy()
    K = torch.randn(64, D, generator=gen, dtype=torch.float64).numpy()
    V = torch.randn(64, D, generator=gen, dtype=torch.float64).numpy()

    # Q fragments as the kernel loads them: a 32-bit pair at (afrag_row, ks*16 + afrag_col(a, 0)).
    qf = [[[[Q[afrag_row[l][a], ks * 16 + afrag_col[l][a][0] + e] for e in range(2)] for a in range(4)]
           for ks in range(D // 16)] for l in range(32)]
    for l in range(32):
        for a in range(4):
            assert afrag_col[l][a][1] == afrag_col[l][a][0] + 1, "a register holds two adjacent columns"

    # S = Q K^T through ldmatrix.x4 of K and mma.
    s = [[[0.0] * 4 for _ in range(8)] for _ in range(32)]  # s[lane][nt][c]
    for np_ in range(4):
        for ks in range(D // 16):
            addr = [(np_ * 16 + k_key[l], ks * 16 + k_dim[l]) for l in range(32)]
            bf = _ptx_ldmatrix_x4(K, addr, trans=False)
            a_regs = [qf[l][ks] for l in range(32)]
            for half in range(2):
                accs = [s[l][2 * np_ + half] for l in range(32)]
                _ptx_mma(accs, a_regs, [[bf[l][2 * half], bf[l][2 * half + 1]] for l in range(32)])
    S = Q @ K.T
    for l in range(32):
        for nt in range(8):
            for c in range(4):
                assert s[l][nt][c] == pytest.approx(S[acc_row[l][c], nt * 8 + acc_col[l][c]], abs=1e-9)

    # O = P V with P = S taken from the accumulators, V through ldmatrix.x4.trans.
    o = [[[0.0] * 4 for _ in range(D // 8)] for _ in range(32)]
    for kk in range(4):
        pa = [[[s[l][p_ntile[kk][a]][p_elem[a][e]] for e in range(2)] for a in range(4)] for l in range(32)]
        for dp in range(D // 16):
            addr = [(kk * 16 + v_key[l], dp * 16 + v_dim[l]) for l in range(32)]
            bf = _ptx_ldmatrix_x4(V, addr, trans=True)
            for half in range(2):
                accs = [o[l][2 * dp + half] for l in range(32)]
                _ptx_mma(accs, pa, [[bf[l][2 * half], bf[l][2 * half + 1]] for l in range(32)])
    O = S @ V
    written = np.full((16, D), np.nan)
    for l in range(32):
        for dt in range(D // 8):
            for rr in range(2):
                col = dt * 8 + acc_col[l][2 * rr]
                assert acc_col[l][2 * rr + 1] == acc_col[l][2 * rr] + 1
                written[acc_row[l][2 * rr], col] = o[l][dt][2 * rr]
                written[acc_row[l][2 * rr], col + 1] = o[l][dt][2 * rr + 1]
    assert not np.isnan(written).any(), "every output element of the tile is written"
    np.testing.assert_allclose(written, O, rtol=1e-9, atol=1e-9)
