"""The CUDA sources without a GPU: nvcc compiles them (their schemas are checked in
``test_schemas.py``)."""
import os
import sys

import pytest
import torch

from mdp_kernels import dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import check_cuda  # noqa: E402


@pytest.mark.skipif(check_cuda.find_nvcc() is None, reason="nvcc was not found")
def test_nvcc_compiles_a_kernel_file():
    """A syntax or type error in the CUDA sources fails CI (``make check-cuda`` compiles
    every file for sm_80 and sm_90; one file for one arch keeps CI short)."""
    path = os.path.join(ROOT, "csrc", "cuda", "bank.cu")
    assert check_cuda.main(["-j", "1", "--archs", "90", path]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_built_ops_are_registered():
    import mdp_kernels.extension as ext

    if ext._C is None or not ext._C.with_cuda:
        pytest.skip("mdp_kernels._C was built without CUDA kernels")
    for name in ("class_sums", "class_sums_bwd", "ce_fwd", "ce_bwd", "pseudo_label",
                 "bank_slot", "bank_prototypes"):
        assert dispatch.has_kernel(name, "cuda"), name
