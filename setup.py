"""Build and install fastpeft.

The Triton sources in ``kernels/`` install as ``fastpeft.kernels`` (never as a top-level ``kernels``, a name another
well-known package owns). The CPU extension ``fastpeft._C`` is built from ``csrc/cpu/*.cpp`` when torch is importable
at build time; set ``FASTPEFT_SKIP_CPU_BUILD=1`` to skip it (the ``cpu`` backend then reports that it is not built
and the reference backend serves). Install with ``pip install --no-build-isolation .`` so the build sees the torch you
already have instead of downloading another one. ``MAX_JOBS`` is honoured by torch's ninja build.
"""

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_extension():
    """``(ext_modules, cmdclass)`` for the C++ CPU backend, or empty ones when skipped or torch is missing."""
    if os.environ.get("FASTPEFT_SKIP_CPU_BUILD", "0") == "1":
        print("fastpeft: FASTPEFT_SKIP_CPU_BUILD=1, not building the CPU extension")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastpeft: torch is not importable at build time, not building the CPU extension")
        return [], {}
    extension = CppExtension(
        "fastpeft._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc", "cpu")],
        # -ffp-contract=fast: ISO C++ mode would otherwise forbid fusing a*b+c into FMA in the vector loops.
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=fast"]},
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def cuda_extension():
    """``(ext_modules, cmdclass)`` for the CUDA kernels ``fastpeft._cuda`` (``csrc/cuda``), built only where torch
    has CUDA and a toolkit is found (``CUDA_HOME``); ``FASTPEFT_SKIP_CUDA_BUILD=1`` skips it. Without it the ``cuda``
    backend reports that it is not built and ``auto`` picks another backend."""
    if os.environ.get("FASTPEFT_SKIP_CUDA_BUILD", "0") == "1":
        print("fastpeft: FASTPEFT_SKIP_CUDA_BUILD=1, not building the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if not torch.cuda.is_available() or CUDA_HOME is None:
        print("fastpeft: no CUDA device or CUDA_HOME, not building the CUDA extension")
        return [], {}
    cuda_dir = os.path.join("csrc", "cuda")
    # host_reference.cpp is the tests' host-only check program, not part of the extension.
    sources = [os.path.join(cuda_dir, "bindings.cpp")] + sorted(glob.glob(os.path.join(cuda_dir, "*.cu")))
    # WMMA on bf16 needs sm_80+; naming the targets here also stops torch from adding older ones.
    arch = os.environ.get("FASTPEFT_CUDA_GENCODE", "-gencode=arch=compute_80,code=sm_80 "
                          "-gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90").split()
    extension = CUDAExtension(
        "fastpeft._cuda",
        sources,
        include_dirs=[os.path.join(HERE, cuda_dir)],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"] + arch},
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpu_extension()
_cuda_modules, _cuda_cmdclass = cuda_extension()
ext_modules += _cuda_modules
cmdclass = {**_cuda_cmdclass, **cmdclass}

# Name, version, dependencies and extras are in pyproject.toml; only what needs code is here.
setup(
    packages=["fastpeft", "fastpeft.backends", "fastpeft.backends.triton", "fastpeft.bench", "fastpeft.kernels"],
    package_dir={"fastpeft.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
