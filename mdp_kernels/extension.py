"""Loads the compiled extension ``mdp_kernels._C`` and registers its kernels.

``torch.ops.mdp_cpu.<op>`` become the ``cpu`` backend and ``torch.ops.mdp_cuda.<op>`` the
``cuda`` backend, op by op, under the names of the kernel contract in ``dispatch``.
"""
from __future__ import annotations

import torch

from . import dispatch

try:
    from . import _C
except ImportError as exc:  # not built: the reference (and Triton) still work
    _C = None
    reason = (f"the C++ extension mdp_kernels._C is not built ({exc}); build it with "
              f"pip install --no-build-isolation -e .")
    dispatch.mark_unavailable("cpu", reason)
    dispatch.mark_unavailable("cuda", reason)


def _register(backend: str, namespace: str) -> None:
    ns = getattr(torch.ops, namespace)
    for op in dispatch.OPS:
        if hasattr(ns, op):
            dispatch.register(backend, op, getattr(ns, op))


if _C is not None:
    _register("cpu", "mdp_cpu")
    if not _C.with_cuda:
        dispatch.mark_unavailable("cuda", "mdp_kernels._C was built without CUDA kernels "
                                          "(PyTorch without CUDA, or nvcc not found)")
    elif not torch.cuda.is_available():
        dispatch.mark_unavailable("cuda", "no CUDA device is available")
    else:
        _register("cuda", "mdp_cuda")
