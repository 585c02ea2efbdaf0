"""Builds mdp_kernels._C: csrc/cpu (C++17/OpenMP) always, csrc/cuda when PyTorch has CUDA and
nvcc is found. The package metadata is in pyproject.toml. Install against the torch already
present:
    pip install --no-build-isolation -e ".[dev]"     # or: pip wheel --no-build-isolation .
"""
import glob
import os
import shutil
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def openmp_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags for OpenMP with the compilers PyTorch supports: MSVC, Apple
    clang (libomp: the one PyTorch's macOS wheels ship in torch/lib, else Homebrew's or
    conda's on the default path) and GCC / LLVM clang."""
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        return ["-Xpreprocessor", "-fopenmp"], ["-L" + torch_lib, "-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


omp_compile, omp_link = openmp_flags()
std = "/std:c++17" if sys.platform == "win32" else "-std=c++17"
cxx_flags = ["/O2" if sys.platform == "win32" else "-O3", std] + omp_compile
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))


def cuda_skip_reason():
    if os.environ.get("MDP_NO_CUDA") == "1":
        return "MDP_NO_CUDA=1"
    if torch.version.cuda is None:
        return "this PyTorch has no CUDA"
    if CUDA_HOME is None or not (shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))):
        return "nvcc was not found"
    if not cuda_sources:
        return "there are no CUDA sources"
    return None


skip = cuda_skip_reason()
if skip is None:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    ext = CUDAExtension(
        "mdp_kernels._C", sources + cuda_sources,
        define_macros=[("MDP_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        extra_link_args=omp_link)
else:
    print(f"mdp-kernels: building the CPU kernels only, not the CUDA kernels: {skip}")
    ext = CppExtension("mdp_kernels._C", sources, extra_compile_args=cxx_flags,
                       extra_link_args=omp_link)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
