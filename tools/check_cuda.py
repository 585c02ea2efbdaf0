"""Compile-check csrc/cuda/*.cu with nvcc, without a GPU.

Each file is compiled (``nvcc -c``, into a temporary directory) with the flags that
``torch.utils.cpp_extension`` uses for the extension, for sm_80 and sm_90, against the
installed PyTorch's headers. Files compile in parallel (``-j``, default 2). Without nvcc
it prints why it skips and exits 0.

    python tools/check_cuda.py [-j N] [--archs 80,90] [files.cu ...]
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("80", "90")  # sm_80 (A100) and sm_90 (H100 / H200)


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def nvcc_flags(nvcc: str, archs=ARCHS) -> list[str]:
    """What cpp_extension passes to nvcc for a CUDAExtension, for ARCHS."""
    import torch
    from torch.utils import cpp_extension as ext

    # include_paths(device_type="cuda") adds CUDA_HOME/include, but a CPU build of PyTorch
    # does not look for CUDA_HOME: add the include dir of this nvcc's toolkit directly.
    home = os.environ.get("CUDA_HOME") or os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    cuda_include = [os.path.join(home, "include")]
    if not os.path.exists(os.path.join(cuda_include[0], "cuda_runtime.h")):
        cuda_include = []  # a wrapper script: nvcc adds its toolkit's include dir itself
    includes = ext.include_paths() + cuda_include + [sysconfig.get_paths()["include"]]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # A CPU build of PyTorch ships the c10/cuda headers but not the generated
    # c10/cuda/impl/cuda_cmake_macros.h (it only sets a Windows export macro): skip it there.
    if not os.path.exists(os.path.join(ext.include_paths()[0], "c10", "cuda", "impl",
                                       "cuda_cmake_macros.h")):
        includes_defs = ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    else:
        includes_defs = []
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return (["-std=c++17", "-O3", "-lineinfo", "--compiler-options", "-fPIC",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_C", "-DMDP_WITH_CUDA"] + includes_defs + ext.COMMON_NVCC_FLAGS + gencode
            + [f"-I{d}" for d in includes])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--archs", default=",".join(ARCHS), help="compute capabilities, e.g. 80,90")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    nvcc = find_nvcc()
    if nvcc is None:
        print("check-cuda: skipped, nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        return 0
    if not files:
        print("check-cuda: no .cu files")
        return 0
    start = time.time()
    archs = args.archs.split(",")
    flags = nvcc_flags(nvcc, archs)
    with tempfile.TemporaryDirectory(prefix="mdp-check-cuda-") as tmp:
        def compile_one(src):
            t0 = time.time()
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            r = subprocess.run([nvcc, "-c", src, "-o", obj] + flags, capture_output=True, text=True)
            return src, r, time.time() - t0

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(compile_one, files))
    failed = 0
    for src, r, dt in results:
        name = os.path.relpath(src, ROOT)
        print(f"check-cuda: {name}: {'ok' if r.returncode == 0 else 'FAILED'} ({dt:.0f} s)")
        if r.returncode != 0:
            failed += 1
            sys.stdout.write(r.stdout + r.stderr)
    print(f"check-cuda: {len(files) - failed}/{len(files)} compiled for sm_{', sm_'.join(archs)} "
          f"in {time.time() - start:.0f} s with {nvcc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
