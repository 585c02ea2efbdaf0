"""Builds mdp_kernels._C: csrc/cpu (C++17/OpenMP) always, csrc/cuda when PyTorch has CUDA and
nvcc is found. Install against the torch already present:
    pip install --no-build-isolation -e ".[dev]"
"""
import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
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
        extra_link_args=["-fopenmp"])
else:
    print(f"mdp-kernels: building the CPU kernels only, not the CUDA kernels: {skip}")
    ext = CppExtension("mdp_kernels._C", sources, extra_compile_args=cxx_flags,
                       extra_link_args=["-fopenmp"])

setup(
    name="mdp-kernels",
    version="0.1.0",
    description="Fused pixel-to-prototype contrastive losses for multi-dataset "
                "segmentation pretraining (MDP)",
    packages=find_packages(include=["mdp_kernels", "mdp_kernels.*", "mdp_train", "mdp_train.*"]),
    python_requires=">=3.10",
    # torch is deliberately not a requirement: build and run against the installed one.
    install_requires=["numpy", "tqdm", "pyyaml", "pillow"],
    extras_require={"dev": ["pytest", "pytest-benchmark", "ninja"]},
    entry_points={"console_scripts": ["mdp-train=mdp_train.cli:main"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
