"""The ``Examples::`` of the public docstrings run (doctest)."""
import doctest

import pytest
import torch
import torch.nn.functional as F

import mdp_kernels as mk
from mdp_kernels import bank, dispatch, functional, modules


@pytest.mark.parametrize("module", [bank, dispatch, functional, modules])
def test_docstring_examples_run(module):
    globs = {"torch": torch, "F": F, **{n: getattr(mk, n) for n in mk.__all__}}
    torch.manual_seed(0)
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
