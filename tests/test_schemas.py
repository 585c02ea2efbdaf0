"""Each kernel phase has one schema: the contract in ``mdp_kernels.dispatch`` (argument names
and order) matches the registered ``mdp_ext`` ops and every backend's kernels."""
import glob
import inspect
import os
import re

import pytest
import torch

from conftest import require
from mdp_kernels import dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def contract_args() -> dict[str, list[str]]:
    """Argument names of each ``name(...)`` signature of the dispatch contract."""
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


def contract_returns() -> dict[str, int]:
    """How many outputs each signature of the dispatch contract returns (after ``->``:
    a parenthesised tuple, or one tensor)."""
    doc, out = dispatch.__doc__, {}
    for m in re.finditer(r"``(\w+)\([^`]*?\)\s*->\s*", doc, re.S):
        i = m.end()
        if doc[i] != "(":
            out[m.group(1)] = 1
            continue
        depth, count = 0, 1
        for ch in doc[i:]:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            count += ch == "," and depth == 1
            if depth == 0:
                break
        out[m.group(1)] = count
    return out


def test_contract_covers_every_phase():
    assert set(contract_args()) == set(dispatch.OPS)


def test_registered_schemas_match_the_contract():
    require("cpu", dispatch.LOSS_OPS)
    contract, returns = contract_args(), contract_returns()
    assert set(returns) == set(dispatch.OPS)
    for op in dispatch.OPS:
        schema = getattr(torch.ops.mdp_ext, op).default._schema
        assert [a.name for a in schema.arguments] == contract[op], op
        assert len(schema.returns) == returns[op], op


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_kernel_takes_the_contract_names(backend):
    require(backend, dispatch.LOSS_OPS)
    contract = contract_args()
    for op in dispatch.OPS:
        if not dispatch.has_kernel(op, backend):
            continue
        fn = dispatch.kernel(op, backend)
        names = ([a.name for a in fn.default._schema.arguments] if hasattr(fn, "default")
                 else list(inspect.signature(fn).parameters))
        assert names == contract[op], (backend, op)


def test_cuda_sources_implement_only_defined_phases():
    """The CUDA files (compiled, not loaded, without a GPU) implement phases of the one
    schema; their registration would fail on a GPU otherwise."""
    for path in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        text = open(path).read()
        assert "m.def(" not in text and "TORCH_LIBRARY_FRAGMENT" not in text, path
        for op in re.findall(r'm\.impl\("(\w+)"', text):
            assert op in dispatch.OPS, (path, op)


@pytest.mark.parametrize("module", ["reference", "layout", "config"])
def test_leaf_modules_import_nothing_of_ours(module):
    """The reference stays an independent ground truth, and the shared helpers stay leaves
    (imports flow one way: the fused path depends on them, never the reverse)."""
    import ast
    import mdp_kernels
    path = os.path.join(os.path.dirname(mdp_kernels.__file__), f"{module}.py")
    tree = ast.parse(open(path).read())
    ours = [ast.unparse(node) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "")
                                                     .startswith("mdp_kernels"))
            or isinstance(node, ast.Import) and any(a.name.startswith("mdp_kernels")
                                                    for a in node.names)]
    assert ours == [], (module, ours)
