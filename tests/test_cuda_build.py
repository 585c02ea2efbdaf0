"""The CUDA sources without a GPU: nvcc compiles them, and their op schemas are exactly the
kernel contract of ``mdp_kernels.dispatch`` (names, argument names and order)."""
import glob
import os
import re
import sys

import pytest
import torch

from mdp_kernels import dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import check_cuda  # noqa: E402

SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
# The cuda backend leaves the consistency and pixel-to-pixel phases to Triton / the reference.
# The saved-basis and saved-softmax paths are CPU-only.
SKIPPED = {"con_fwd", "con_bwd", "pix_fwd", "pix_bwd", "ce_fwd_basis", "ce_bwd_basis",
           "ce_fwd_probs", "ce_bwd_probs", "con_fwd_basis", "con_bwd_basis"}


def _blocks(text: str, head: str) -> str:
    """The bodies of every ``head { ... }`` block of ``text``."""
    out = []
    for m in re.finditer(re.escape(head) + r"[^{]*\{", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end():i - 1])
    return "\n".join(out)


def cuda_schemas() -> dict[str, str]:
    schemas, impls = {}, set()
    for path in SOURCES:
        text = open(path).read()
        for body in re.findall(r'm\.def\(((?:\s*"[^"]*")+)\s*\)',
                               _blocks(text, "TORCH_LIBRARY_FRAGMENT(mdp_cuda, m)")):
            schema = "".join(re.findall(r'"([^"]*)"', body))
            schemas[schema.split("(", 1)[0]] = schema
        impls |= set(re.findall(r'm\.impl\("(\w+)"',
                                _blocks(text, "TORCH_LIBRARY_IMPL(mdp_cuda, CUDA, m)")))
    assert impls == set(schemas), "every mdp_cuda schema needs exactly one CUDA impl"
    return schemas


def contract_args() -> dict[str, list[str]]:
    """Argument names of each ``name(...)`` signature in the dispatch docstring."""
    doc, out = dispatch.__doc__, {}
    for m in re.finditer(r"``(\w+)\(", doc):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(doc[i], 0)
            i += 1
        args, depth, cur = [], 0, ""
        for ch in doc[m.end():i - 1] + ",":
            if ch == "," and depth == 0:
                args.append(cur.split()[0])
                cur = ""
            else:
                depth += {"(": 1, ")": -1}.get(ch, 0)
                cur += ch
        out[m.group(1)] = args
    return out


def test_schemas_match_the_kernel_contract():
    schemas, contract = cuda_schemas(), contract_args()
    assert set(schemas) == set(dispatch.OPS) - SKIPPED
    for name, schema in schemas.items():
        parsed = torch._C.parse_schema(f"mdp_cuda::{schema}")
        assert [a.name for a in parsed.arguments] == contract[name], name


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
    for name in cuda_schemas():
        assert dispatch.kernel(name, "cuda") is not None
