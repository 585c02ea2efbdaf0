"""Public functional API. Each function validates its inputs, resolves the backend, and runs
either the plain-PyTorch reference or the ``mdp::`` custom ops (fused kernels).

Conventions (see DESIGN.md section 2): features are ``(B, D, *spatial)`` with labels
``(B, *spatial)``, or ``(N, D)`` with labels ``(N,)`` (one image). Prototypes are ``(C, D)``
of the features' dtype. Inputs may be float32, bfloat16, float16 or float64; accumulation is
float32 or better and losses come back as float32 (float64 for float64 inputs).
``backend`` is ``"auto" | "reference" | "cpu" | "cuda" | "triton"``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch, ops, reference, validation as V
from .reference import as_bdp, as_bp

__all__ = ["class_embedding_sums", "masked_average_pool", "prototype_contrast_loss",
           "prototype_consistency_loss", "pixel_contrast_loss", "pseudo_label"]


def _check_labels_eager(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    # The fused path checks inside the ``mdp::targets`` op; the reference path checks here
    # (skipped while compiling, where a data-dependent check would break the graph).
    if not torch.compiler.is_compiling():
        V.check_label_values(labels, num_classes, ignore_index)


def _bias(class_mask: Tensor | None) -> Tensor | None:
    if class_mask is None:
        return None
    return torch.zeros(class_mask.shape, dtype=torch.float32,
                       device=class_mask.device).masked_fill(~class_mask, float("-inf"))


def _check_num_classes(num_classes) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _spatial(x: Tensor) -> torch.Size:
    return x.shape[:1] + x.shape[2:]


def class_embedding_sums(feats: Tensor, labels: Tensor, num_classes: int, *,
                         ignore_index: int = 255, backend: str = "auto"
                         ) -> tuple[Tensor, Tensor]:
    r"""Per-image sums of the features of each class, in one pass over the features.

    ``sums[b, j] = sum_{i in image b, y_i = j} f_i`` and ``counts[b, j] = #{i : y_i = j}``.

    Args:
        feats: ``(B, D, *spatial)`` or ``(N, D)`` (then ``B = 1``).
        labels: ``(B, *spatial)`` or ``(N,)``, integer; ``ignore_index`` pixels are skipped.
        num_classes: ``C``.

    Returns:
        ``sums`` ``(B, C, D)`` (float32, float64 for float64 input; differentiable w.r.t.
        ``feats``) and ``counts`` ``(B, C)`` int64.
    """
    V.check_feats_labels(feats, labels)
    _check_num_classes(num_classes)
    name = dispatch.resolve(("class_sums", "class_sums_bwd"), backend, feats.device)
    if name == "reference":
        _check_labels_eager(labels, num_classes, ignore_index)
        return reference.class_embedding_sums(feats, labels, num_classes, ignore_index)
    t = ops.targets(as_bp(labels), None, num_classes, ignore_index)
    return ops.class_sums(as_bdp(feats), t, num_classes, name)


def masked_average_pool(feats: Tensor, labels: Tensor, num_classes: int, *,
                        ignore_index: int = 255, backend: str = "auto"
                        ) -> tuple[Tensor, Tensor]:
    r"""Per-image class means (paper Eq. 2, first step).

    ``means[b, j] = sums[b, j] / counts[b, j]`` where ``counts[b, j] > 0``, else 0.

    Returns:
        ``means`` ``(B, C, D)`` (float32, float64 for float64 input; differentiable w.r.t.
        ``feats``) and ``present`` ``(B, C)`` bool (``counts > 0``).
    """
    sums, counts = class_embedding_sums(feats, labels, num_classes, ignore_index=ignore_index,
                                        backend=backend)
    return sums / counts.clamp(min=1).unsqueeze(-1).to(sums.dtype), counts > 0


# Below this many classes the logit recompute costs less than writing and reading the
# feature-sized basis (measured on the 2-core CPU: C = 64 recompute 72 ms vs basis 79 ms,
# C = 128 basis 106 ms vs recompute 118 ms, N = 65,536, D = 256).
BASIS_MIN_CLASSES = 96


def _save_basis(name: str, feats: Tensor, num_classes: int, op: str = "ce") -> bool:
    """Store the gradient basis in the ``op`` ("ce" or "con") forward (``{op}_fwd_basis``)
    so the feature gradient needs no logit recompute: only when that gradient will be
    taken and C is large enough for the saved GEMM to pay for the extra feature-sized pass."""
    return (feats.requires_grad and torch.is_grad_enabled()
            and num_classes >= BASIS_MIN_CLASSES
            and dispatch.has_kernel(f"{op}_fwd_basis", name)
            and dispatch.has_kernel(f"{op}_bwd_basis", name))


def _ce_saved(name: str, feats: Tensor, prototypes: Tensor) -> str:
    """What the CE forward keeps for its backward (``ops.ce_fwd``'s ``save``): the basis E
    for many classes; for fewer classes than ``BASIS_MIN_CLASSES`` and at most D / 2 (the
    softmax is then at most half the features' size, so memory stays O(N D)) the softmax
    S itself, so the backward needs no logit recompute for dF nor dP; else nothing."""
    c, d = prototypes.shape
    if not torch.is_grad_enabled() or not (feats.requires_grad or prototypes.requires_grad):
        return "none"
    if _save_basis(name, feats, c):
        return "basis"
    if (c < BASIS_MIN_CLASSES and 2 * c <= d and dispatch.has_kernel("ce_fwd_probs", name)
            and dispatch.has_kernel("ce_bwd_probs", name)):
        return "probs"
    return "none"


def prototype_contrast_loss(feats: Tensor, prototypes: Tensor, labels: Tensor, *,
                            tau: float = 0.07, ignore_index: int = 255,
                            class_mask: Tensor | None = None, labels_b: Tensor | None = None,
                            lam: float | Tensor | None = None, reduction: str = "mean",
                            check_finite: bool = True, backend: str = "auto") -> Tensor:
    r"""Pixel-to-prototype contrastive loss (paper Eq. 3) with pixel-level mixing (Eq. 6).

    With :math:`z_{ik} = f_i \cdot P_k / \tau` over the allowed classes,
    :math:`\ell(i, y) = \log\sum_k e^{z_{ik}} - z_{iy}`, the cross-entropy of pixel ``i``
    against its class prototype. The logsumexp is computed once per pixel, streaming over
    class tiles (never an ``N x C`` matrix in the fused backends).

    Args:
        feats: ``(B, D, *spatial)`` or ``(N, D)`` pixel embeddings (MDP feeds unit-norm ones).
        prototypes: ``(C, D)``, same dtype; gets a gradient when it requires grad.
        labels: ``(B, *spatial)`` or ``(N,)`` integer targets ``a_i`` in ``[0, C)`` or
            ``ignore_index``.
        tau: temperature.
        class_mask: optional ``(C,)`` bool; False classes take no part in any softmax and a
            pixel whose target is such a class is ignored for that target.
        labels_b, lam: mixing (Eq. 6): second targets ``b_i`` (shape of ``labels``) and
            ``lam``, a float or a ``(B,)`` tensor in [0, 1] (one per image). Both or neither.
        reduction: ``"mean"``: without mixing, the mean of ``l(i, a_i)`` over pixels with a
            valid allowed target; with mixing, ``mean_valid_a(lam_i l(i,a_i)) +
            mean_valid_b((1-lam_i) l(i,b_i))``, exactly ``lam * CE(a) + (1 - lam) * CE(b)``
            for a scalar ``lam``. A mean over no pixels is 0 with zero gradient.
            ``"sum"``: the sum of the per-pixel terms. ``"none"``: per pixel, shape of
            ``labels`` (an invalid target contributes 0).
        check_finite: raise ``ValueError`` on NaN/inf features or prototypes (one extra
            read; turn off for speed).

    cpu backend, when a gradient will be taken (2 matrix products per forward + feature
    backward instead of 3): with C >= 96 and ``feats`` requiring grad, the forward keeps
    the softmax expectation ``E_i = sum_k softmax(z_i)_k P_k / tau``, one feature-sized
    float32 (float64) buffer alive until the backward, so the feature gradient is an
    O(N D) pass (prototype gradients still recompute the logit tiles). With C < 96 and
    ``2 C <= D`` it keeps the ``N x C`` softmax instead (at most half the features' size,
    what eager autograd keeps too), and neither gradient recomputes logits.

    Returns:
        float32 loss (float64 for float64 inputs).
    """
    V.check_feats_labels(feats, labels)
    V.check_prototypes(prototypes, feats)
    V.check_temperature(tau, "tau")
    V.check_reduction(reduction)
    c = prototypes.shape[0]
    V.check_class_mask(class_mask, c, feats.device)
    if (labels_b is None) != (lam is None):
        raise ValueError("mixing needs both labels_b and lam (or neither)")
    if labels_b is not None:
        V.check_feats_labels(feats, labels_b, lname="labels_b")
        V.check_lam(lam, feats.shape[0] if feats.dim() > 2 else 1, feats.device)
    name = dispatch.resolve(("ce_fwd", "ce_bwd"), backend, feats.device)
    if name == "reference":
        _check_labels_eager(labels, c, ignore_index)
        if labels_b is not None:
            _check_labels_eager(labels_b, c, ignore_index)
        if check_finite and not torch.compiler.is_compiling():
            V.check_finite(feats, "feats")
            V.check_finite(prototypes, "prototypes")
        return reference.prototype_contrast_loss(feats, prototypes, labels, tau, ignore_index,
                                                 class_mask, labels_b, lam, reduction)
    ta = ops.targets(as_bp(labels), class_mask, c, ignore_index)
    tb = None if labels_b is None else ops.targets(as_bp(labels_b), class_mask, c, ignore_index)
    lse, za, zb, _ = ops.ce_fwd(as_bdp(feats), prototypes.contiguous(), ta, tb,
                                _bias(class_mask), float(tau), name, check_finite,
                                _ce_saved(name, feats, prototypes))
    va = ta >= 0
    la = torch.where(va, lse - za, 0.0)
    if tb is None:
        return reference.reduce(la, va.sum(), reduction, labels.shape)
    vb = tb >= 0
    lb = torch.where(vb, lse - zb, 0.0)
    return reference.mix_reduce(la, va, lb, vb, lam, reduction, labels.shape)


def prototype_consistency_loss(student: Tensor, teacher: Tensor, prototypes: Tensor, *,
                               tau_student: float = 0.07, tau_teacher: float = 0.04,
                               mask: Tensor | None = None, class_mask: Tensor | None = None,
                               kind: str = "ce", reduction: str = "mean",
                               check_finite: bool = True, backend: str = "auto") -> Tensor:
    r"""Pixel-to-prototype consistency (paper Eqs. 7-8).

    :math:`t_i = \mathrm{softmax}(g_i \cdot P / \tau_t)` from the teacher feature ``g_i`` at
    the same pixel, :math:`s_i = \log\mathrm{softmax}(f_i \cdot P / \tau_s)`;
    ``kind="ce"``: :math:`-\sum_k t_{ik} s_{ik}`; ``kind="kl"``:
    :math:`\mathrm{KL}(t_i \,\|\, \mathrm{softmax}_s) = \mathrm{ce}_i - H(t_i)`.

    The teacher distribution is a constant: no gradient reaches ``teacher``, nor
    ``prototypes`` through the teacher softmax (the paper's stop-gradient); ``prototypes``
    that require grad get the student-path gradient.

    Args:
        student, teacher: ``(B, D, *spatial)`` or ``(N, D)``, same shape and dtype.
        prototypes: ``(C, D)``.
        mask: optional bool of the spatial shape selecting contributing pixels (default:
            every pixel, labelled or not). "mean" averages over the selected pixels.
        class_mask: optional ``(C,)`` bool of classes that take part in both softmaxes; if
            no class is allowed the loss is 0.

    Returns:
        float32 loss (float64 for float64 inputs); ``"none"`` gives the spatial shape.
    """
    V.check_float(student, "student")
    V.check_float(teacher, "teacher")
    if student.shape != teacher.shape or student.dim() < 2:
        raise ValueError(f"student and teacher must have the same (N, D) or (B, D, *spatial) "
                         f"shape, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    V.check_same_device("student", student, "teacher", teacher)
    V.check_same_dtype("student", student, "teacher", teacher)
    V.check_prototypes(prototypes, student, "student")
    V.check_temperature(tau_student, "tau_student")
    V.check_temperature(tau_teacher, "tau_teacher")
    V.check_reduction(reduction)
    if kind not in ("ce", "kl"):
        raise ValueError(f"kind must be 'ce' or 'kl', got {kind!r}")
    V.check_class_mask(class_mask, prototypes.shape[0], student.device)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor of the spatial shape")
        if mask.shape != _spatial(student):
            raise ValueError(f"mask must have shape {tuple(_spatial(student))}, got "
                             f"{tuple(mask.shape)}")
        V.check_same_device("mask", mask, "student", student)
    name = dispatch.resolve(("con_fwd", "con_bwd"), backend, student.device)
    if name == "reference":
        if check_finite and not torch.compiler.is_compiling():
            for t, n in ((student, "student"), (teacher, "teacher"), (prototypes, "prototypes")):
                V.check_finite(t, n)
        return reference.prototype_consistency_loss(student, teacher, prototypes, tau_student,
                                                    tau_teacher, mask, class_mask, kind,
                                                    reduction)
    keep = None if mask is None else as_bp(mask).contiguous()
    if class_mask is not None:
        keep = (torch.ones(as_bp(student[:, 0]).shape, dtype=torch.bool, device=student.device)
                if keep is None else keep) & class_mask.any()
    ce, ent, _, _, _ = ops.con_fwd(as_bdp(student), as_bdp(teacher.detach()),
                                   prototypes.contiguous(), _bias(class_mask), keep,
                                   float(tau_student), float(tau_teacher), name, check_finite,
                                   _save_basis(name, student, prototypes.shape[0], "con"))
    loss = ce if kind == "ce" else ce - ent
    count = loss.new_tensor(loss.numel()) if keep is None else keep.sum()
    return reference.reduce(loss, count, reduction, _spatial(student))


def pixel_contrast_loss(feats_q: Tensor, labels_q: Tensor, feats_k: Tensor, labels_k: Tensor,
                        *, tau: float = 0.07, ignore_index: int = 255,
                        num_classes: int | None = None, reduction: str = "mean",
                        check_finite: bool = True, backend: str = "auto") -> Tensor:
    r"""Pixel-to-pixel contrastive baseline (paper Eq. 1), per image, query view vs key view.

    .. math::
        \ell_i = \log \sum_{j \in \mathrm{valid}} e^{q_i \cdot k_j / \tau}
                 - \frac{1}{N_{y_i}} \sum_{j : y_j = y_i} q_i \cdot k_j / \tau

    where ``j`` runs over the key pixels of the same image and ``N_y`` counts key pixels
    labelled ``y``. Query pixels that are ignored, or whose class is absent from the key
    view, do not contribute. The positive term is ``q_i . mean_k(y_i) / tau`` (key-view
    class means), so only the logsumexp is quadratic; it is streamed flash-attention style.
    The paper averages both directions: call twice with the views swapped.

    Args:
        feats_q, feats_k: ``(B, D, *spatial)`` (spatial sizes may differ) or ``(N, D)``.
        labels_q, labels_k: matching integer labels.
        num_classes: number of classes, needed by the fused path for the key-view class
            means; ``None`` infers ``max label + 1`` (a host sync: pass it under
            ``torch.compile``).
    """
    V.check_feats_labels(feats_q, labels_q, "feats_q", "labels_q")
    V.check_feats_labels(feats_k, labels_k, "feats_k", "labels_k")
    V.check_same_device("feats_q", feats_q, "feats_k", feats_k)
    V.check_same_dtype("feats_q", feats_q, "feats_k", feats_k)
    if feats_q.dim() != feats_k.dim() or feats_q.shape[:2] != feats_k.shape[:2]:
        raise ValueError(f"feats_q and feats_k must share batch and channel dims, got "
                         f"{tuple(feats_q.shape)} and {tuple(feats_k.shape)}")
    V.check_temperature(tau, "tau")
    V.check_reduction(reduction)
    if num_classes is None:
        seen = torch.cat([labels_q[labels_q != ignore_index].flatten(),
                          labels_k[labels_k != ignore_index].flatten()])
        num_classes = max(int(seen.max()) + 1, 1) if seen.numel() else 1
    _check_num_classes(num_classes)
    name = dispatch.resolve(("pix_fwd", "pix_bwd"), backend, feats_q.device)
    if name == "reference":
        _check_labels_eager(labels_q, num_classes, ignore_index)
        _check_labels_eager(labels_k, num_classes, ignore_index)
        if check_finite and not torch.compiler.is_compiling():
            V.check_finite(feats_q, "feats_q")
            V.check_finite(feats_k, "feats_k")
        return reference.pixel_contrast_loss(feats_q, labels_q, feats_k, labels_k, tau,
                                             ignore_index, reduction)
    means, present = masked_average_pool(feats_k, labels_k, num_classes,
                                         ignore_index=ignore_index, backend=backend)
    tq = ops.targets(as_bp(labels_q), None, num_classes, ignore_index)
    tk = ops.targets(as_bp(labels_k), None, num_classes, ignore_index)
    qvalid = (tq >= 0) & present.gather(1, tq.clamp(min=0))
    q3 = as_bdp(feats_q)
    lse = ops.pix_fwd(q3, as_bdp(feats_k), qvalid, tk >= 0, float(tau), name, check_finite)
    pos_mean = means.gather(1, tq.clamp(min=0).unsqueeze(-1).expand(-1, -1, means.shape[-1]))
    pos = torch.einsum("bdp,bpd->bp", q3.to(means.dtype), pos_mean) / tau
    loss = torch.where(qvalid, lse - pos, 0.0)
    return reference.reduce(loss, qvalid.sum(), reduction, labels_q.shape)


def pseudo_label(feats: Tensor, prototypes: Tensor, *, threshold: float = 0.8,
                 class_mask: Tensor | None = None, ignore_index: int = 255,
                 backend: str = "auto") -> tuple[Tensor, Tensor]:
    r"""Pseudo-labels for unlabelled pixels (paper Eq. 10), in one streaming pass.

    ``score_i = max_k f_i . P_k`` over allowed classes (raw similarity, no temperature, not
    a softmax probability); ``label_i = argmax_k`` (lowest index on ties) when
    ``score_i >= threshold``, else ``ignore_index``. No gradient.

    Returns:
        ``labels`` int64 and ``scores`` float32, both of the spatial shape
        (``(B, *spatial)``, or ``(N,)`` for ``(N, D)`` input).
    """
    V.check_float(feats, "feats")
    if feats.dim() < 2:
        raise ValueError(f"feats must be (N, D) or (B, D, *spatial), got {tuple(feats.shape)}")
    V.check_prototypes(prototypes, feats)
    V.check_class_mask(class_mask, prototypes.shape[0], feats.device)
    name = dispatch.resolve(("pseudo_label",), backend, feats.device)
    if name == "reference":
        return reference.pseudo_label(feats.detach(), prototypes.detach(), threshold,
                                      class_mask, ignore_index)
    labels, scores = ops.pseudo_label(as_bdp(feats.detach()), prototypes.detach().contiguous(),
                                      _bias(class_mask), float(threshold), ignore_index, name)
    return labels.reshape(_spatial(feats)), scores.reshape(_spatial(feats))
