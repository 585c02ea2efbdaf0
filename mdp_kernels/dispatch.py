"""Backend registry: the one place where an op's kernel is chosen.

Every public op is split into kernel phases that a backend implements. The public
functional layer (``mdp_kernels.functional``) validates inputs and turns labels into
targets; the ``torch.library`` ops in ``mdp_kernels.ops`` run the kernel that ``kernel``
returns for a phase and a resolved backend. ``backend="reference"`` never reaches this registry:
it runs the plain-PyTorch math of ``mdp_kernels.reference`` directly.

Kernel contract (all backends; ``acc`` = float64 for float64 inputs, float32 otherwise).
``mdp_kernels.ops`` calls every phase with keyword arguments of the names below, which are
also those of the C++ schemas (``csrc/schema.cpp``) and of the Triton wrappers, as
``tests/test_schemas.py`` checks against the registered ops.

Inputs are already checked. ``feats``-like tensors are 3-D ``(B, D, P)`` views that may be
strided (``(B, D, H, W)`` flattened, or an ``(N, D)`` matrix seen as ``(1, D, N)``).
``targets`` are int64 ``(B, P)`` with values in ``[-1, C)``; ``-1`` means "no target"
(ignored pixel, or a class masked out). ``bias`` is ``None`` or a float32 ``(C,)`` of
``0`` (class allowed) and ``-inf`` (class masked out), added to the scaled logits.
``protos`` is a contiguous ``(C, D)`` of the features' dtype. z_ik = f_i . P_k / tau + bias_k.

``class_sums(feats, targets, num_classes) -> (sums (B,C,D) acc, counts (B,C) int64)``
``class_sums_bwd(grad_sums (B,C,D) acc, feats, targets) -> dfeats (B,D,P) feats.dtype``
    dfeats[b, :, p] = grad_sums[b, targets[b, p]] (0 where targets is -1).
``ce_fwd(feats, protos, ta, tb, bias, sw, tau) -> (lse, za, zb, zq)``, each ``(B, P)`` acc.
    ``tb`` may be None (then zb is zeros). A pixel with no target (ta = -1 and tb None
    or -1) is skipped: lse = za = zb = zq = 0, no FLOPs. Otherwise lse_i = logsumexp_k
    z_ik, za_i = z_{i,ta_i} (0 where ta_i = -1), likewise zb. ``sw`` (label smoothing's
    class weights) is None or float32 ``(C,)`` / ``(B, C)``, 0 on masked classes:
    zq_i = sum_k sw_k z_ik (zeros when None).
``ce_bwd(g_lse, g_za, g_zb, g_zq, feats, protos, ta, tb, bias, sw, lse, tau, need_feats,
        need_protos) -> (dfeats (B,D,P) feats.dtype or None, dprotos (C,D) protos.dtype or None)``
    dz_ik = g_lse_i * exp(z_ik - lse_i) + g_za_i [k = ta_i] + g_zb_i [k = tb_i] + g_zq_i sw_k
    over non-skipped pixels; dfeats_i = sum_k dz_ik P_k / tau; dprotos_k = sum_i dz_ik f_i / tau.
    ``g_zb`` is None when ``tb`` is None, ``g_zq`` when ``sw`` is.
``ce_fwd_basis(feats, protos, ta, tb, bias, sw, tau) -> (lse, za, zb, zq, E)``, optional (a
        backend may implement this pair; ``ce_fwd``/``ce_bwd`` are still required):
    ``ce_fwd`` plus the softmax expectation E_i = sum_k exp(z_ik - lse_i) P_k / tau, a
    ``(B, D, P)`` tensor of ``feats``' dtype (bf16 inputs multiply in bf16, so the product
    is bf16 anyway) laid out like ``feats`` (0 on skipped pixels).
``ce_bwd_basis(g_lse, g_za, g_zb, g_zq, E, feats, protos, ta, tb, sw, tau) -> dfeats``
    dfeats_i = g_lse_i E_i + g_za_i P_{ta_i} / tau + g_zb_i P_{tb_i} / tau + g_zq_i sum_k
    sw_k P_k / tau (a target's term only where it is >= 0; 0 on skipped pixels): the
    ``ce_bwd`` feature gradient without recomputing logits (``feats`` gives only the
    output's dtype and layout).
``ce_fwd_probs(feats, protos, ta, tb, bias, sw, tau) -> (lse, za, zb, zq, S)``, optional like
        ``ce_fwd_basis``: ``ce_fwd`` plus the softmax S_ik = exp(z_ik - lse_i), a contiguous
    ``(B, P, C)`` acc tensor (0 on skipped pixels); worth its memory only for few classes.
``ce_bwd_probs(g_lse, g_za, g_zb, g_zq, S, feats, protos, ta, tb, sw, tau, need_feats,
        need_protos) -> (dfeats or None, dprotos or None)``: ``ce_bwd`` with dz_ik = g_lse_i
    S_ik + ..., no logit recompute.
``ce_fwd_grad(feats, protos, ta, tb, bias, sw, c_lse, c_za, c_zb, c_zq, tau, need_feats,
        need_protos) -> (lse, za, zb, zq, dfeats or None, dprotos or None)``, optional:
    ``ce_fwd`` plus the gradients of the linear loss L = sum_i c_lse_i lse_i + c_za_i za_i
    + c_zb_i zb_i + c_zq_i zq_i (``c_zb`` / ``c_zq`` given exactly with ``tb`` / ``sw``),
    i.e. ``ce_bwd`` with g = c, from the forward's own logit tiles: what a "mean" or "sum"
    loss needs (its gradient is then a scalar times these).
``con_fwd(student, teacher, protos, bias, mask, tau_s, tau_t) -> (ce, ent, lse_s, lse_t)``
    each ``(B, P)`` acc; ``mask`` is None or bool ``(B, P)`` (False: skipped, all zeros).
    s = log_softmax(z^s), t = softmax(z^t) (z^s with tau_s on the student, z^t with tau_t
    on the teacher); ce_i = -sum_k t_ik s_ik, ent_i = -sum_k t_ik log t_ik.
``con_bwd(g_ce, student, teacher, protos, bias, mask, lse_s, lse_t, tau_s, tau_t,
          need_feats, need_protos) -> (dstudent (B,D,P) or None, dprotos (C,D) or None)``
    dz^s_ik = g_ce_i (softmax(z^s)_ik - t_ik); t is a constant (stop-gradient).
    dstudent_i = sum_k dz^s_ik P_k / tau_s; dprotos_k = sum_i dz^s_ik f_i / tau_s.
``con_fwd_basis(student, teacher, protos, bias, mask, tau_s, tau_t) -> (ce, ent, lse_s, lse_t,
        G)``, optional like ``ce_fwd_basis``: ``con_fwd`` plus G_i = sum_k (softmax(z^s)_ik -
    t_ik) P_k / tau_s, a ``(B, D, P)`` tensor of ``student``'s dtype laid out like
    ``student`` (0 on skipped pixels).
``con_bwd_basis(g_ce, G, student) -> dstudent (B,D,P) student.dtype``
    dstudent_i = g_ce_i G_i: the ``con_bwd`` student gradient without recomputing logits
    (``student`` gives only the output's dtype and layout).
``pix_fwd(q (B,D,P), k (B,D,Pk), qmask (B,P) bool, kmask (B,Pk) bool, tau) -> lse (B,P) acc``
    lse_i = logsumexp over keys j of the same image with kmask of q_i . k_j / tau, for
    query pixels with qmask (0 elsewhere, and 0 when an image has no valid key).
``pix_bwd(g_lse, q, k, qmask, kmask, lse, tau, need_q, need_k) -> (dq or None, dk or None)``
    a_ij = exp(q_i . k_j / tau - lse_i); dq_i = g_i sum_j a_ij k_j / tau;
    dk_j = sum_i g_i a_ij q_i / tau (over valid i, j of the same image).
``pseudo_label(feats, protos, bias, threshold, ignore_index) -> (labels (B,P) int64,
        scores (B,P) float32)``: score_i = max_k (f_i . P_k + bias_k), label_i = the
    lowest k attaining it if score_i >= threshold else ignore_index (no temperature).
``normalize_fwd(x (B,D,P), eps) -> (y (B,D,P) x.dtype, norm (B,P) acc)``
    F.normalize over D: norm_i = |x_i|, y_i = x_i / max(norm_i, eps).
``normalize_bwd(grad (B,D,P), y, norm, eps) -> dx (B,D,P) y.dtype``
    dx_i = (g_i - y_i (y_i . g_i)) / norm_i where norm_i >= eps, else g_i / eps.
``bank_slot(sums (B,C,D) acc, counts (B,C) int64) -> (S (C,D) acc, n (C,) acc)``
    S_j = sum_b [counts_bj > 0] sums_bj / counts_bj, n_j = sum_b [counts_bj > 0].
``bank_prototypes(sums (K,C,D), counts (K,C), normalize) -> (P (C,D), valid (C,) bool)``
    P_j = sum_s sums_sj / sum_s counts_sj (0 where invalid), L2-normalised rows if
    ``normalize``.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .config import config

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
# The phases every loss needs: a backend that has them all runs every public op.
LOSS_OPS = ("class_sums", "class_sums_bwd", "ce_fwd", "ce_bwd", "con_fwd", "con_bwd",
            "pix_fwd", "pix_bwd", "pseudo_label")
# Bank reductions (O(slots C D)) and the feature normalisation (O(N D)), no matmul: a
# backend without them leaves them to the reference implementation on the same device
# (``resolve_phase``).
BANK_OPS = ("bank_slot", "bank_prototypes")
NORM_OPS = ("normalize_fwd", "normalize_bwd")
ELEMENTWISE_OPS = BANK_OPS + NORM_OPS
# Optional pairs a backend may add to save work in the backward (see the contract above).
OPTIONAL_OPS = ("ce_fwd_basis", "ce_bwd_basis", "ce_fwd_probs", "ce_bwd_probs",
                "con_fwd_basis", "con_bwd_basis", "ce_fwd_grad")
OPS = LOSS_OPS + ELEMENTWISE_OPS + OPTIONAL_OPS

_kernels: dict[str, dict[str, Callable]] = {"cpu": {}, "cuda": {}, "triton": {}}
# backend -> policy(op, num_classes, dim) -> preferences among "grad", "basis", "probs" and
# "none": what the forward of loss ``op`` ("ce" or "con") keeps for its backward, per backend.
_save_policies: dict[str, Callable[[str, int, int], tuple[str, ...]]] = {}
# Why a backend cannot run here, filled in by the module that tried to load it.
_unavailable: dict[str, str] = {}


def register(backend: str, op: str, fn: Callable) -> None:
    """Register ``fn`` as ``backend``'s kernel for kernel phase ``op``."""
    if backend not in _kernels:
        raise ValueError(f"unknown kernel backend {backend!r}")
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}")
    _kernels[backend][op] = fn


def register_save_policy(backend: str,
                         policy: Callable[[str, int, int], tuple[str, ...]]) -> None:
    """Register ``backend``'s choice of what a forward keeps for its backward:
    ``policy(op, num_classes, dim)`` returns choices in order of preference."""
    _save_policies[backend] = policy


def saved_for_backward(op: str, backend: str, num_classes: int, dim: int, *,
                       feats_grad: bool, protos_grad: bool, reduced: bool = False) -> str:
    """What the ``op`` ("ce" or "con") forward on ``backend`` keeps for its backward:
    ``config.save``, or when it is "auto" the first of the backend's preferences that can
    serve; "none" when none can. A choice serves where the backend has its pair of kernels
    and a gradient uses it ("basis" serves the feature gradient only). "grad" (the
    gradients computed in the forward, ``{op}_fwd_grad``) serves a ``reduced`` loss, whose
    gradient is a scalar times coefficients known before the kernel runs, whose prototypes
    take a gradient, in eager mode (compiled graphs keep the recompute path)."""
    if config.save == "auto":
        choices = _save_policies.get(backend, lambda *_: ())(op, num_classes, dim)
    else:
        choices = (config.save,)
    for choice in choices:
        if choice == "grad":
            if (reduced and protos_grad and has_kernel(f"{op}_fwd_grad", backend)
                    and not torch.compiler.is_compiling()):
                return choice
            continue
        useful = feats_grad if choice == "basis" else (feats_grad or protos_grad)
        if (choice != "none" and useful and has_kernel(f"{op}_fwd_{choice}", backend)
                and has_kernel(f"{op}_bwd_{choice}", backend)):
            return choice
    return "none"


def mark_unavailable(backend: str, reason: str) -> None:
    _unavailable[backend] = reason


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` failed to load here (not built, not installed, no device), or None."""
    return _unavailable.get(backend)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _device_ok(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason it cannot. Every loaded
    backend accepts meta tensors (its fake kernels give the output shapes)."""
    if backend in _unavailable:
        return _unavailable[backend]
    if device.type == "meta":
        return None
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got a {device.type} tensor"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
    if backend == "triton" and device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run its "
                "kernels on CPU tensors through the Triton interpreter)")
    return None


def _auto_order(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "cuda")  # cuda is experimental: only where Triton is missing
    if device.type == "cpu":
        return ("cpu",)
    return ()


def resolve(ops: tuple[str, ...], backend: str, device: torch.device) -> str:
    """The backend that will run kernel phases ``ops`` on ``device``: a kernel backend or
    "reference".

    ``auto`` picks the fastest kernel backend that has all of ``ops`` for the device and
    falls back to the reference. An explicit backend that cannot run raises
    ``RuntimeError`` saying why.
    """
    check_backend(backend)
    if backend == "reference":
        return "reference"
    if backend == "auto":
        for name in _auto_order(device):
            if _device_ok(name, device) is None and all(op in _kernels[name] for op in ops):
                return name
        return "reference"
    reason = _device_ok(backend, device)
    missing = [op for op in ops if op not in _kernels[backend]]
    if reason is None and missing:
        reason = f"it has no kernel for {', '.join(missing)}"
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")
    return backend


def resolve_phase(op: str, backend: str, device: torch.device) -> str:
    """``resolve((op,), ...)`` for an elementwise phase (bank, normalisation), which a
    kernel backend that lacks it leaves to the reference (documented on ``PrototypeBank``
    and the losses' ``normalize``)."""
    if backend not in ("auto", "reference") and op in ELEMENTWISE_OPS and _device_ok(
            backend, device) is None and op not in _kernels[backend]:
        return "reference"
    return resolve((op,), backend, device)


def check_runnable(backend: str) -> None:
    """Raise ``RuntimeError`` if ``backend`` cannot run on any device of this machine (not
    built, not installed, no GPU): what module constructors check, before any data."""
    check_backend(backend)
    if backend in ("auto", "reference"):
        return
    devices = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu")}[backend]
    reasons = [_device_ok(backend, torch.device(d)) for d in devices]
    if all(reasons):
        raise RuntimeError(f"backend {backend!r} is unavailable: {reasons[0]}")
    missing = [op for op in LOSS_OPS if op not in _kernels[backend]]
    if missing:
        raise RuntimeError(f"backend {backend!r} is unavailable: it has no kernel for "
                           f"{', '.join(missing)}")


def has_kernel(op: str, backend: str) -> bool:
    """Whether the (already resolved) ``backend`` implements the optional phase ``op``."""
    return op in _kernels.get(backend, {})


def kernel(op: str, backend: str) -> Callable:
    """The kernel registered for ``op`` by the (already resolved) ``backend``."""
    return _kernels[backend][op]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run every loss on ``device`` ("reference" always can): loaded,
    able to run there, and with every phase of ``LOSS_OPS``.

    Args:
        device: where the tensors will live (a ``torch.device`` or its name).

    Examples::

        >>> available_backends("cpu")[0]
        'reference'
        >>> "cpu" in available_backends("cpu")  # the C++ extension is built
        True
    """
    device = torch.device(device)
    names = ["reference"]
    for name in ("cpu", "cuda", "triton"):
        if _device_ok(name, device) is None and all(op in _kernels[name] for op in LOSS_OPS):
            names.append(name)
    return names
