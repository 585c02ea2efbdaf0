"""Loads the compiled extension ``mdp_kernels._C`` and registers its kernels.

Every kernel phase is one op, ``torch.ops.mdp_ext.<phase>`` (schemas in ``csrc/schema.cpp``);
the phases with a CPU kernel are the ``cpu`` backend, those with a CUDA kernel the ``cuda``
backend, under the names of the kernel contract in ``dispatch``.
"""
from __future__ import annotations

import torch

from . import dispatch
from .config import config

try:
    from . import _C
except ImportError as exc:  # not built: the reference (and Triton) still work
    _C = None
    reason = (f"the C++ extension mdp_kernels._C is not built ({exc}); build it with "
              f"pip install --no-build-isolation -e .")
    dispatch.mark_unavailable("cpu", reason)
    dispatch.mark_unavailable("cuda", reason)


def _register(backend: str, key: str) -> None:
    """Register the phases that have a kernel for dispatch key ``key`` as ``backend``'s."""
    for op in dispatch.OPS:
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"mdp_ext::{op}", key):
            dispatch.register(backend, op, getattr(torch.ops.mdp_ext, op))


# Below this many classes the logit recompute costs less than writing and reading the
# feature-sized basis (measured on the 2-core CPU: C = 64 recompute 72 ms vs basis 79 ms,
# C = 128 basis 106 ms vs recompute 118 ms, N = 65,536, D = 256).
CPU_BASIS_MIN_CLASSES = 96


def cpu_save_policy(op: str, num_classes: int, dim: int) -> tuple[str, ...]:
    """The basis from ``CPU_BASIS_MIN_CLASSES`` up (it saves a GEMM); below, for CE with
    ``2 C <= D``, the softmax itself (then at most half the features' size, so memory stays
    O(N D)), which spares both gradients the logit recompute; else nothing. Where CE keeps
    no softmax, the gradients computed in its forward come first (no logit recompute for
    dP)."""
    if op == "ce" and num_classes < CPU_BASIS_MIN_CLASSES and 2 * num_classes <= dim:
        return ("probs",)
    keep = "basis" if num_classes >= CPU_BASIS_MIN_CLASSES else "none"
    return ("grad", keep) if op == "ce" else (keep,)


def _push_settings(cfg) -> None:
    _C.set_settings(cfg.cpu_tile_rows or 0, cfg.cpu_pix_cols or 0, cfg.deterministic)


if _C is not None:
    config.on_change(_push_settings)
    _register("cpu", "CPU")
    dispatch.register_save_policy("cpu", cpu_save_policy)
    if not _C.with_cuda:
        dispatch.mark_unavailable("cuda", "mdp_kernels._C was built without CUDA kernels "
                                          "(PyTorch without CUDA, or nvcc not found)")
    elif not torch.cuda.is_available():
        dispatch.mark_unavailable("cuda", "no CUDA device is available")
    else:
        _register("cuda", "CUDA")
