"""Build script. The CUDA extension ``vgkernels._C`` is optional.

It is built only when torch is a CUDA build and nvcc is found, unless
``VGKERNELS_BUILD_CUDA=0``; ``VGKERNELS_BUILD_CUDA=1`` makes a missing toolkit an
error instead of a skip. ``VGKERNELS_CUDA_ARCHS`` (default ``80;90``) lists the
compute capabilities. A CPU install never fails for want of CUDA: it says why it
skipped and installs the pure-Python package.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    want = os.environ.get("VGKERNELS_BUILD_CUDA", "auto").lower()
    if want in ("0", "false", "no", "off"):
        print("vgkernels: VGKERNELS_BUILD_CUDA=0, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        reason = f"torch is not importable in the build environment ({e}); install with --no-build-isolation"
    else:
        if not torch.version.cuda:
            reason = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None and shutil.which("nvcc") is None:
            reason = "nvcc was not found (set CUDA_HOME)"
        elif not sources:
            reason = "csrc/ has no sources"
    if reason:
        if want in ("1", "true", "yes", "on"):
            raise SystemExit(f"vgkernels: VGKERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"vgkernels: skipping the CUDA extension: {reason}", file=sys.stderr)
        return [], {}
    archs = [a.strip() for a in os.environ.get("VGKERNELS_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    gencode = []
    for a in archs:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    ext = CUDAExtension(
        "vgkernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # cxx: no -std, so torch's build helper picks the standard its headers need (C++20
        # for recent torch). nvcc compiles only the torch-free kernels. No --use_fast_math:
        # the kernels rely on IEEE -inf/NaN handling (empty rows, NaN metric rows), and the
        # exp2f of the softmax maps to the hardware ex2 instruction without it.
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo"] + gencode,
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="vgkernels",
    version="0.1.0",
    description="Fused attention-capture, grounding-metric and knockout kernels for vision-language models",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vgkernels", "vgkernels.*"]) + ["vgkernels.integrations"],
    package_dir={"vgkernels": "vgkernels", "vgkernels.integrations": "integrations"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.57",
        "numpy",
        "einops",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "flash": ["flash-attn"],
        "sweep": ["pillow", "matplotlib", "tqdm", "pyarrow", "accelerate"],
    },
    entry_points={"console_scripts": ["vgkernels=vgkernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
