"""Data-dependent input checks as ``mdp::`` custom ops, and the guard against autograd
transforms that the fused kernels do not implement.

A check that reads tensor values cannot be plain Python: ``torch.compile`` would have to
skip it and ``torch.export`` would drop it. As custom ops they run on every path (eager,
compiled graphs, exported programs) and every backend, the reference included. So that no
compiler can remove one as dead code, each returns something its caller consumes:
``targets`` (the checked labels as targets), or a 0-d zero *token* that the caller adds to
its result (adding 0.0 leaves every value, and every gradient, unchanged). Their fake
implementations give shapes only, so meta and fake tensors pass through unchecked.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor


def _token(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device)


# ---------------------------------------------------------------- labels -> targets
@torch.library.custom_op("mdp::targets", mutates_args=())
def targets(labels: Tensor, class_mask: Optional[Tensor], num_classes: int,
            ignore_index: int) -> Tensor:
    """int64 targets: the label, or -1 for ``ignore_index`` and classes outside
    ``class_mask`` (``(C,)``, or ``(B, C)`` for ``(B, P)`` labels: per image). Raises
    ``ValueError`` on any other label outside ``[0, num_classes)``."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = labels[bad].flatten()[0].item()
        raise ValueError(f"label value {value} is outside [0, {num_classes}) and is not "
                         f"ignore_index ({ignore_index})")
    t = torch.where(labels == ignore_index, -1, labels.to(torch.int64))
    if class_mask is not None:
        index = t.clamp(min=0)
        allowed = class_mask[index] if class_mask.dim() == 1 else class_mask.gather(1, index)
        t = torch.where(allowed, t, -1)
    return t.contiguous()


@targets.register_fake
def _(labels, class_mask, num_classes, ignore_index):
    return torch.empty(labels.shape, dtype=torch.int64, device=labels.device)


# ---------------------------------------------------------------- value tokens
def finite_or_raise(t: Tensor, name: str) -> None:
    # min and max propagate NaN and expose +-inf: one vectorised pass, no bool temporary
    # (30x faster than isfinite(t).all() on CPU). Reduce over the tensor in memory order,
    # as a strided (e.g. (N, D) seen as (1, D, N)) reduction is many times slower.
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    dense = t.permute(order)
    t = dense if dense.is_contiguous() else t
    if t.numel() and not all(bool(torch.isfinite(v)) for v in torch.aminmax(t)):
        raise ValueError(f"{name} contains NaN or infinite values (pass check_finite=False "
                         f"to skip this check)")


@torch.library.custom_op("mdp::check_finite", mutates_args=())
def check_finite(t: Tensor, name: str) -> Tensor:
    """Token; raises ``ValueError`` naming ``name`` if ``t`` holds NaN or +-inf."""
    finite_or_raise(t, name)
    return _token(t)


@check_finite.register_fake
def _(t, name):
    return t.new_empty((), dtype=torch.float32)


def interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


@torch.library.custom_op("mdp::check_range", mutates_args=())
def check_range(t: Tensor, name: str, lo: float, hi: float, lo_open: bool,
                hi_open: bool) -> Tensor:
    """Token; raises ``ValueError`` unless every value of ``t`` lies in the interval."""
    bad = t.isnan() | ((t <= lo) if lo_open else (t < lo)) | ((t >= hi) if hi_open else (t > hi))
    if bool(bad.any()):
        raise ValueError(f"{name} must lie in {interval(lo, hi, lo_open, hi_open)}, got "
                         f"{t[bad].flatten()[0].item():g}")
    return _token(t)


@check_range.register_fake
def _(t, name, lo, hi, lo_open, hi_open):
    return t.new_empty((), dtype=torch.float32)


def check_positive(t: Tensor, name: str) -> Tensor:
    """Token for a temperature-like tensor: positive and finite."""
    return check_range(t.detach(), name, 0.0, math.inf, True, True)


# ---------------------------------------------------------------- ordering of state writes
@torch.library.custom_op("mdp::after", mutates_args=())
def after(x: Tensor, deps: list[Tensor]) -> Tensor:
    """A copy of ``x`` that depends on ``deps``: a state write fed from it happens after
    ``deps`` are computed (and their checks passed), also inside a compiled graph, where
    only data dependencies order operations."""
    return x.clone()


@after.register_fake
def _(x, deps):
    return torch.empty_like(x)


# ---------------------------------------------------------------- autograd transforms
def _transforms() -> set[str]:
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return {str(i.key()).rsplit(".", 1)[-1] for i in stack}


def forbid_transforms(fn: str, backend: str, *tensors: Optional[Tensor]) -> None:
    """Raise ``RuntimeError`` when forward-mode AD or a ``torch.func`` gradient transform
    would run the fused kernels of ``fn``: they implement reverse-mode autograd only, and
    would otherwise give a zero tangent or an internal error. ``vmap`` is fine."""
    if torch.compiler.is_compiling():
        return
    hint = (f"{fn} (backend={backend!r}): {{}} is not supported by the fused kernels, which "
            f"implement reverse-mode autograd only; use backend='reference' (plain PyTorch)")
    active = _transforms() & {"Grad", "Jvp"}
    if active:
        kind = "torch.func.jvp" if "Jvp" in active else "torch.func.grad / vjp / jacrev"
        raise RuntimeError(hint.format(kind))
    if fwAD._current_level >= 0 and any(
            t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(hint.format("forward-mode AD (torch.autograd.forward_ad)"))
