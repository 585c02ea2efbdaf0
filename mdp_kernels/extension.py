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


# Below this many classes the logit recompute costs less than writing and reading the
# feature-sized basis (measured on the 2-core CPU: C = 64 recompute 72 ms vs basis 79 ms,
# C = 128 basis 106 ms vs recompute 118 ms, N = 65,536, D = 256).
CPU_BASIS_MIN_CLASSES = 96


def cpu_save_policy(op: str, num_classes: int, dim: int) -> str:
    """The basis from ``CPU_BASIS_MIN_CLASSES`` up (it saves a GEMM); below, for CE with
    ``2 C <= D``, the softmax itself (then at most half the features' size, so memory stays
    O(N D)), which spares both gradients the logit recompute; else nothing."""
    if num_classes >= CPU_BASIS_MIN_CLASSES:
        return "basis"
    return "probs" if op == "ce" and 2 * num_classes <= dim else "none"


if _C is not None:
    _register("cpu", "mdp_cpu")
    dispatch.register_save_policy("cpu", cpu_save_policy)
    if not _C.with_cuda:
        dispatch.mark_unavailable("cuda", "mdp_kernels._C was built without CUDA kernels "
                                          "(PyTorch without CUDA, or nvcc not found)")
    elif not torch.cuda.is_available():
        dispatch.mark_unavailable("cuda", "no CUDA device is available")
    else:
        _register("cuda", "mdp_cuda")
