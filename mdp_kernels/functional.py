"""Public functional API. Each function validates its inputs, resolves the backend, and runs
either the plain-PyTorch reference or the ``mdp::`` custom ops (fused kernels).

Conventions: features are ``(B, D, *spatial)`` with labels
``(B, *spatial)``, or ``(N, D)`` with labels ``(N,)`` (one image). Prototypes are ``(C, D)``
of the features' dtype. Inputs may be float32, bfloat16, float16 or float64; accumulation is
float32 or better and losses come back as float32 (float64 for float64 inputs).
``backend`` is ``"auto" | "reference" | "cpu" | "cuda" | "triton"``.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from . import checks, dispatch, ops, reference, validation as V
from .layout import acc_dtype, as_bdp, as_bp, mix_reduce, reduce, spatial

# What every docstring says once (formatted in below).
_COMMON = r"""ignore_index: the label of pixels that have no target (default -100, as
            ``F.cross_entropy``). It must not be a class: a value in ``[0, C)`` raises
            ``ValueError`` (it would silently drop that class).
        backend: ``"auto"`` | ``"reference"`` | ``"cpu"`` | ``"cuda"`` | ``"triton"``.

    Autograd: reverse mode on every backend; the fused backends are differentiable once
    (a double backward raises, naming the op) and raise a clear error under forward-mode
    AD and ``torch.func`` gradient transforms (``backend="reference"`` supports all of
    them). ``torch.compile`` / ``torch.export``: every check above also runs inside
    compiled graphs and exported programs, but forward-mode AD tangents are not supported
    there (a compiled graph of the fused backends drops the tangent, None, instead of
    raising: use forward AD in eager mode). Meta and fake tensors give shapes only."""

_TAU = r"""a positive number or a 0-d floating tensor; a tensor that requires grad
            is a learnable temperature (exact gradient on every backend), and a tensor
            whose value changes is not a recompile under ``torch.compile`` (nor is a Python
            float after the second value: dynamo then traces it as a symbol); the kernels
            read the value on the host, so a CUDA tensor costs one small copy per call"""

_NORMALIZE = r"""if True, L2-normalise each pixel's embedding inside the op, exactly
            ``F.normalize(x, dim=1)`` (eps 1e-12: a zero embedding stays zero), with the
            gradient through the normalisation. On the cpu and triton backends that is one
            fused pass over the features each way (``F.normalize`` makes a norm, a division
            and their autograd graph), and nothing feature-sized beyond the normalised
            features, which the loss keeps anyway; the reference and a backend without that
            kernel (cuda) use ``F.normalize``'s formula"""

_MEMORY = r"""``"auto"``: what the forward keeps for the backward is the backend's
            policy (below) or ``mdp_kernels.config.save``; ``"low"``: nothing beyond the
            per-pixel statistics, so the backward recomputes the logit tiles (one more matrix
            product) and the workspace is O(chunk), not feature-sized"""

_AUTOCAST = r"""Under ``torch.autocast`` the features and prototypes are cast to the
    autocast dtype first (float64 stays), as ``F.linear`` does; outside it their dtypes
    must match."""

__all__ = ["class_embedding_sums", "masked_average_pool", "prototype_contrast_loss",
           "prototype_consistency_loss", "pixel_contrast_loss", "pseudo_label"]


def _batch(feats: Tensor) -> int:
    """Images in ``feats``: B of (B, D, *spatial), 1 for (N, D)."""
    return feats.shape[0] if feats.dim() > 2 else 1


def _bias(class_mask: Tensor | None) -> Tensor | None:
    if class_mask is None:
        return None
    return torch.zeros(class_mask.shape, dtype=torch.float32,
                       device=class_mask.device).masked_fill(~class_mask, float("-inf"))


def _check_num_classes(num_classes) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _shared_doc(fn):
    """Fill in the docstring parts that several ops share (each written once above)."""
    fn.__doc__ = (fn.__doc__.replace("@COMMON", _COMMON).replace("@TAU", _TAU)
                  .replace("@AUTOCAST", _AUTOCAST).replace("@NORMALIZE", _NORMALIZE)
                  .replace("@MEMORY", _MEMORY))
    return fn


def _autocast(*ts: Tensor) -> tuple:
    """Inside ``torch.autocast`` for the tensors' device, floating inputs other than float64
    in the autocast dtype (what ``F.linear`` does to its operands)."""
    dev = ts[0].device.type
    if not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return ts
    dt = torch.get_autocast_dtype(dev)
    return tuple(t if t.dtype == torch.float64 else t.to(dt) for t in ts)


def _exact(device: torch.device):
    """A block where autocast is off for ``device``: the ops' own accumulation-dtype glue
    (done after the inputs were cast) must stay in that dtype."""
    dev = device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def _tau_arg(tau) -> Tensor:
    """The 0-d tensor the custom ops read the temperature from. A Python number becomes a
    float64 CPU tensor through a multiplication, which dynamo traces as a graph input
    instead of guarding on the value (``torch.tensor(tau)`` would recompile per value)."""
    return tau.detach() if isinstance(tau, Tensor) else torch.ones((), dtype=torch.float64) * tau


def _carry_tau_grad(tau, prefer: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """Route a learnable temperature's gradient around the kernels, which see tau as a value.

    The logits are ``x . y / tau``; multiplying ``x`` by ``tau.detach() / tau`` (exactly
    1.0, so ``x`` is unchanged bit for bit) makes autograd give ``dL/dtau =
    -(1/tau) sum x . dL/dx``, the exact gradient. ``x`` is ``prefer`` when it already gets a
    gradient (no extra kernel work beyond one elementwise pass), else ``other``.
    """
    if not (isinstance(tau, Tensor) and tau.requires_grad and torch.is_grad_enabled()):
        return prefer, other
    one = tau.detach() / tau
    if prefer.requires_grad:
        return prefer * one, other
    return prefer, other * one


def _normalized(op: str, x: Tensor, backend: str) -> Tensor:
    """``F.normalize(x, dim=1)`` for ``op``, in one pass each way on ``backend``'s kernel
    (the reference's formula where the backend has none), in ``x``'s shape."""
    name = dispatch.resolve_phase("normalize_fwd", backend, x.device)
    if name == "reference" or x.numel() == 0:
        return reference.normalize(x)
    checks.forbid_transforms(op, name, x)
    y, _ = ops.normalize_fwd(as_bdp(x), backend=name)
    return y[0].t() if x.dim() == 2 else y.unflatten(2, x.shape[2:])


def _plus(result: Tensor, tokens: list[Tensor]) -> Tensor:
    """``result`` made to depend on the check tokens (each a 0-d zero: values unchanged)."""
    for t in tokens:
        result = result + t
    return result


def _finite_tokens(check: bool, **tensors: Tensor) -> list[Tensor]:
    return [checks.check_finite(t.detach(), name) for name, t in tensors.items()] if check else []


def _tau_tokens(**taus) -> list[Tensor]:
    return [checks.check_positive(t, name) for name, t in taus.items() if isinstance(t, Tensor)]


@_shared_doc
def class_embedding_sums(feats: Tensor, labels: Tensor, num_classes: int, *,
                         ignore_index: int = -100, backend: str = "auto"
                         ) -> tuple[Tensor, Tensor]:
    r"""Per-image sums of the features of each class, in one pass over the features.

    ``sums[b, j] = sum_{i in image b, y_i = j} f_i`` and ``counts[b, j] = #{i : y_i = j}``.

    Args:
        feats: ``(B, D, *spatial)`` or ``(N, D)`` (then ``B = 1``).
        labels: ``(B, *spatial)`` or ``(N,)``, integer; ``ignore_index`` pixels are skipped.
        num_classes: ``C``.
        @COMMON

    Shape:
        ``sums`` ``(B, C, D)`` (float32, float64 for float64 input; differentiable w.r.t.
        ``feats``) and ``counts`` ``(B, C)`` int64.

    Examples::

        >>> f, y = torch.randn(2, 8, 4, 4), torch.randint(0, 3, (2, 4, 4))
        >>> sums, counts = class_embedding_sums(f, y, 3)
        >>> sums.shape, int(counts.sum())
        (torch.Size([2, 3, 8]), 32)
    """
    V.check_feats_labels(feats, labels)
    _check_num_classes(num_classes)
    V.check_ignore_index(ignore_index, num_classes)
    name = dispatch.resolve(("class_sums", "class_sums_bwd"), backend, feats.device)
    t = checks.targets(labels, None, num_classes, ignore_index)
    if name == "reference":
        return reference.class_embedding_sums(feats, t, num_classes, -1)
    checks.forbid_transforms("class_embedding_sums", name, feats)
    return ops.class_sums(as_bdp(feats), as_bp(t), num_classes, name)


def masked_average_pool(feats: Tensor, labels: Tensor, num_classes: int, *,
                        ignore_index: int = -100, backend: str = "auto"
                        ) -> tuple[Tensor, Tensor]:
    r"""Per-image class means (paper Eq. 2, first step).

    ``means[b, j] = sums[b, j] / counts[b, j]`` where ``counts[b, j] > 0``, else 0.
    Arguments as :func:`class_embedding_sums`.

    Shape:
        ``means`` ``(B, C, D)`` (float32, float64 for float64 input; differentiable w.r.t.
        ``feats``) and ``present`` ``(B, C)`` bool (``counts > 0``).

    Examples::

        >>> f, y = torch.randn(2, 8, 4, 4), torch.randint(0, 3, (2, 4, 4))
        >>> means, present = masked_average_pool(f, y, 3)
        >>> means.shape, present.shape
        (torch.Size([2, 3, 8]), torch.Size([2, 3]))
    """
    return _means(*class_embedding_sums(feats, labels, num_classes, ignore_index=ignore_index,
                                        backend=backend))


def _means(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Class means (0 where a class is absent) and presence, from class sums and counts."""
    return sums / counts.clamp(min=1).unsqueeze(-1).to(sums.dtype), counts > 0


def _saved(op: str, name: str, feats: Tensor, protos: Tensor, memory: str,
           reduced: bool = False) -> str:
    """What the ``op`` forward keeps for its backward (``dispatch.saved_for_backward``;
    nothing with ``memory="low"``)."""
    if memory == "low":
        return "none"
    grad = torch.is_grad_enabled()
    return dispatch.saved_for_backward(op, name, protos.shape[0], protos.shape[1],
                                       feats_grad=grad and feats.requires_grad,
                                       protos_grad=grad and protos.requires_grad,
                                       reduced=reduced)


@_shared_doc
def prototype_contrast_loss(feats: Tensor, prototypes: Tensor, labels: Tensor, *,
                            tau: float | Tensor = 0.07, ignore_index: int = -100,
                            class_mask: Tensor | None = None, labels_b: Tensor | None = None,
                            lam: float | Tensor | None = None, reduction: str = "mean",
                            weight: Tensor | None = None, label_smoothing: float = 0.0,
                            normalize: bool = False, memory: str = "auto",
                            check_finite: bool = True, backend: str = "auto") -> Tensor:
    r"""Pixel-to-prototype contrastive loss (paper Eq. 3) with pixel-level mixing (Eq. 6).

    With :math:`z_{ik} = f_i \cdot P_k / \tau` over the allowed classes,
    :math:`\ell(i, y) = \log\sum_k e^{z_{ik}} - z_{iy}`, the cross-entropy of pixel ``i``
    against its class prototype. The logsumexp is computed once per pixel, streaming over
    class tiles (never an ``N x C`` matrix in the fused backends). With ``tau=1`` it is
    ``F.cross_entropy(f @ P.T, y)``.

    Args:
        feats: ``(B, D, *spatial)`` or ``(N, D)`` pixel embeddings (MDP feeds unit-norm ones).
        prototypes: ``(C, D)``, same dtype; gets a gradient when it requires grad.
        labels: ``(B, *spatial)`` or ``(N,)`` integer targets ``a_i`` in ``[0, C)`` or
            ``ignore_index``.
        tau: temperature: @TAU.
        class_mask: optional bool ``(C,)`` (every image) or ``(B, C)`` (image b's softmax
            runs over its own allowed classes: e.g. its dataset's); False classes take no
            part in the softmax and a pixel whose target is such a class is ignored for that
            target. Applied as a per-image bias inside the kernels (no ``N x C`` mask).
        labels_b, lam: mixing (Eq. 6): second targets ``b_i`` (shape of ``labels``) and
            ``lam``, a float or a ``(B,)`` tensor in [0, 1] (one per image). Both or neither.
        reduction: ``"mean"``: without mixing, the mean of ``l(i, a_i)`` over pixels with a
            valid allowed target; with mixing, ``mean_valid_a(lam_i l(i,a_i)) +
            mean_valid_b((1-lam_i) l(i,b_i))``, exactly ``lam * CE(a) + (1 - lam) * CE(b)``
            for a scalar ``lam``. A mean over no pixels is 0 with zero gradient.
            ``"sum"``: the sum of the per-pixel terms. ``"none"``: per pixel, shape of
            ``labels`` (an invalid target contributes 0).
        weight: optional ``(C,)`` non-negative class weights, as ``F.cross_entropy(weight=)``:
            a pixel's term is scaled by its target's weight and ``"mean"`` divides by the sum
            of the valid targets' weights (0 when that sum is 0). With mixing each of the
            two terms uses its own target's weight and its own normaliser. No gradient.
        label_smoothing: in [0, 1], as ``F.cross_entropy(label_smoothing=)`` (with
            ``weight``, PyTorch's weighted form). With ``class_mask`` the uniform part spreads
            over the allowed classes only. Computed from the kernels' logsumexp and
            ``sum_k w_k z_ik``, which they sum on the logit tiles (no extra pass; the cuda
            backend has no such kernel and raises).
        normalize: @NORMALIZE.
        memory: @MEMORY.
        check_finite: raise ``ValueError`` on NaN/inf features or prototypes (one extra
            read; turn off for speed).
        @COMMON

    @AUTOCAST

    With ``memory="auto"`` what the forward keeps for the backward is the backend's policy,
    or ``mdp_kernels.config.save``. The cpu backend, when a gradient will be taken (2 matrix
    products per forward + feature backward instead of 3): with many classes (C at least
    ``mdp_kernels.extension.CPU_BASIS_MIN_CLASSES``) and ``feats`` requiring grad, the
    forward keeps the softmax expectation ``E_i = sum_k softmax(z_i)_k P_k / tau``, one
    buffer of the features' size and dtype alive until the backward, so the feature gradient
    is an O(N D) pass (prototype gradients still recompute the logit tiles). With fewer
    classes and ``2 C <= D`` it keeps the ``N x C`` softmax instead (at most half the
    features' size, what eager autograd keeps too), and neither gradient recomputes logits.
    Where it keeps no softmax, a reduced loss whose prototypes require grad gets both
    gradients from the forward's logit tiles (eager mode; the backward only scales them), so
    the prototype gradient does not recompute the logits either.

    Shape:
        A 0-d float32 loss (float64 for float64 inputs); ``reduction="none"``: the shape of
        ``labels``.

    Examples::

        >>> f = F.normalize(torch.randn(2, 16, 8, 8, requires_grad=True), dim=1)
        >>> P = F.normalize(torch.randn(342, 16), dim=1)
        >>> y = torch.randint(0, 342, (2, 8, 8)); y[:, :2] = -100
        >>> loss = prototype_contrast_loss(f, P, y, tau=0.1)
        >>> loss.backward()
        >>> mixed = prototype_contrast_loss(f.detach(), P, y, labels_b=y.flip(0),
        ...                                 lam=torch.tensor([0.3, 0.8]))
    """
    V.check_float(feats, "feats")
    V.check_float(prototypes, "prototypes")
    feats, prototypes = _autocast(feats, prototypes)
    V.check_feats_labels(feats, labels)
    V.check_prototypes(prototypes, feats)
    tau = V.temperature(tau, "tau")
    V.check_reduction(reduction)
    c = prototypes.shape[0]
    V.check_ignore_index(ignore_index, c)
    V.check_class_mask(class_mask, c, feats.device, _batch(feats))
    if (labels_b is None) != (lam is None):
        raise ValueError("mixing needs both labels_b and lam (or neither)")
    if labels_b is not None:
        V.check_feats_labels(feats, labels_b, lname="labels_b")
        V.check_lam(lam, feats.shape[0] if feats.dim() > 2 else 1, feats.device)
    V.check_class_weight(weight, c, feats.device)
    V.check_label_smoothing(label_smoothing)
    V.check_memory(memory)
    name = dispatch.resolve(("ce_fwd", "ce_bwd"), backend, feats.device)
    if normalize:
        feats = _normalized("prototype_contrast_loss", feats, name)
    tokens = _tau_tokens(tau=tau)
    if isinstance(lam, Tensor):
        tokens.append(checks.check_range(lam.detach(), "lam", 0.0, 1.0, False, False))
    if weight is not None:
        tokens.append(checks.check_range(weight, "weight", 0.0, math.inf, False, True))
    if name == "reference":
        ta = checks.targets(labels, None, c, ignore_index)
        tb = None if labels_b is None else checks.targets(labels_b, None, c, ignore_index)
        tokens += _finite_tokens(check_finite, feats=feats, prototypes=prototypes)
        return _plus(reference.prototype_contrast_loss(
            feats, prototypes, ta, tau, -1, class_mask, tb, lam, reduction, weight,
            label_smoothing), tokens)
    checks.forbid_transforms("prototype_contrast_loss", name, feats, prototypes, tau)
    protos, feats = _carry_tau_grad(tau, prototypes, feats)
    ta = checks.targets(as_bp(labels), class_mask, c, ignore_index)
    tb = (None if labels_b is None
          else checks.targets(as_bp(labels_b), class_mask, c, ignore_index))
    sw = _smoothing_weights(c, class_mask, weight, label_smoothing, feats)

    def value(lse, za, zb, zq):  # the loss from the kernel's per-pixel statistics
        term = _ce_terms(lse, zq, sw, class_mask, weight, label_smoothing)
        la, na = term(ta, za)
        if tb is None:
            return reduce(la, na, reduction, labels.shape)
        lb, nb = term(tb, zb)
        return mix_reduce(la, na, lb, nb, lam, reduction, labels.shape)

    args = (as_bdp(feats), protos.contiguous(), ta, tb, _bias(class_mask), sw, _tau_arg(tau))
    saved = _saved("ce", name, feats, protos, memory, reduced=reduction != "none")
    if saved == "grad":
        return _plus(_ce_grad_in_forward(value, args, feats, protos, name, check_finite), tokens)
    lse, za, zb, zq, _ = ops.ce_fwd(*args, backend=name, check_finite=check_finite, save=saved)
    return _plus(value(lse, za, zb, zq), tokens)


def _ce_grad_in_forward(value, args: tuple, feats: Tensor, protos: Tensor, name: str,
                        check_finite: bool) -> Tensor:
    """``value`` of the statistics with the feature and prototype gradients computed by the
    forward: ``value`` is linear in (lse, za, zb, zq), so its gradient coefficients, taken
    by autograd at zero placeholders, are exact; the backward only scales dF and dP."""
    bdp, ta, tb, sw = args[0], args[2], args[3], args[5]
    acc = acc_dtype(bdp.dtype)
    holes = [torch.zeros(ta.shape, dtype=acc, device=ta.device, requires_grad=True)
             for _ in range(4)]
    with torch.enable_grad():
        coefs = torch.autograd.grad(value(*holes), holes, allow_unused=True)
    coefs = [torch.zeros_like(h) if c is None else c for h, c in zip(holes, coefs)]
    lse, za, zb, zq, df, dp = ops.ce_fwd_grad(  # the gradients go through scaled_grads
        bdp.detach(), args[1].detach(), *args[2:], coefs[0], coefs[1],
        None if tb is None else coefs[2],
        None if sw is None else coefs[3], backend=name, check_finite=check_finite,
        need_feats=feats.requires_grad, need_protos=protos.requires_grad)
    return value(lse, za, zb, zq) + ops.scaled_grads(bdp, args[1], df, dp)


def _smoothing_weights(c: int, class_mask: Tensor | None, weight: Tensor | None, eps: float,
                       feats: Tensor) -> Tensor | None:
    """Label smoothing's class weights ``sw`` (the kernels' ``sw``), or None without
    smoothing: ``weight`` (or 1) on the allowed classes, 0 on masked ones; ``(C,)``, or
    ``(B, C)`` with a per-image mask; in the accumulation dtype."""
    if not eps:
        return None
    acc = acc_dtype(feats.dtype)
    sw = (torch.ones(c, dtype=acc, device=feats.device) if weight is None
          else weight.to(acc))
    return sw if class_mask is None else sw * class_mask


def _ce_terms(lse: Tensor, zq: Tensor, sw: Tensor | None, class_mask: Tensor | None,
              weight: Tensor | None, eps: float):
    """``term(targets, target_logits) -> (per-pixel loss, normaliser)`` of one target from
    the kernel's outputs. Label smoothing's uniform part, ``sum_k w_k (lse_i - z_ik)`` over
    the allowed classes divided by their count, is ``(W lse_i - zq_i) / K`` with the kernel's
    ``zq_i = sum_k sw_k z_ik`` (summed on the logit tiles: no extra pass)."""
    smooth = None
    if eps:  # per image: W and K, (1 or B, 1)
        rows = sw.reshape(-1, sw.shape[-1])
        count = (torch.ones_like(rows, dtype=torch.bool) if class_mask is None
                 else class_mask.reshape(-1, sw.shape[-1])).sum(-1, keepdim=True)
        smooth = (rows.sum(-1, keepdim=True) * lse - zq) / count.clamp(min=1)

    def term(t: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
        valid = t >= 0
        per = lse - zt
        if weight is None:
            norm = valid.sum()
        else:
            wt = weight.to(lse.dtype)[t.clamp(min=0)]
            per, norm = wt * per, torch.where(valid, wt, 0.0).sum()
        if eps:
            per = (1 - eps) * per + eps * smooth
        return torch.where(valid, per, 0.0), norm
    return term


@_shared_doc
def prototype_consistency_loss(student: Tensor, teacher: Tensor, prototypes: Tensor, *,
                               tau_student: float | Tensor = 0.07,
                               tau_teacher: float | Tensor = 0.04,
                               mask: Tensor | None = None, class_mask: Tensor | None = None,
                               kind: str = "ce", reduction: str = "mean",
                               normalize: bool = False, memory: str = "auto",
                               check_finite: bool = True, backend: str = "auto") -> Tensor:
    r"""Pixel-to-prototype consistency (paper Eqs. 7-8).

    :math:`t_i = \mathrm{softmax}(g_i \cdot P / \tau_t)` from the teacher feature ``g_i`` at
    the same pixel, :math:`s_i = \log\mathrm{softmax}(f_i \cdot P / \tau_s)`;
    ``kind="ce"``: :math:`-\sum_k t_{ik} s_{ik}`; ``kind="kl"``:
    :math:`\mathrm{KL}(t_i \,\|\, \mathrm{softmax}_s) = \mathrm{ce}_i - H(t_i)`.

    The teacher distribution is a constant: no gradient reaches ``teacher``, ``tau_teacher``,
    nor ``prototypes`` through the teacher softmax (the paper's stop-gradient);
    ``prototypes`` that require grad get the student-path gradient.

    Args:
        student, teacher: ``(B, D, *spatial)`` or ``(N, D)``, same shape and dtype.
        prototypes: ``(C, D)``.
        tau_student, tau_teacher: temperatures: @TAU.
        mask: optional bool of the spatial shape selecting contributing pixels (default:
            every pixel, labelled or not). "mean" averages over the selected pixels.
        class_mask: optional bool ``(C,)`` or per-image ``(B, C)``: the classes that take
            part in both softmaxes; an image with no allowed class contributes nothing (and
            does not count in "mean").
        kind: ``"ce"`` or ``"kl"``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        normalize: student and teacher both: @NORMALIZE.
        memory: @MEMORY (the cpu backend keeps ``G_i = sum_k (s_ik - t_ik) P_k / tau_s``
            from ``mdp_kernels.extension.CPU_BASIS_MIN_CLASSES`` classes up).
        check_finite: raise ``ValueError`` on NaN/inf inputs.
        @COMMON

    @AUTOCAST

    Shape:
        A 0-d float32 loss (float64 for float64 inputs); ``"none"`` gives the spatial shape.

    Examples::

        >>> s = F.normalize(torch.randn(2, 16, 8, 8, requires_grad=True), dim=1)
        >>> t = F.normalize(torch.randn(2, 16, 8, 8), dim=1)
        >>> P = F.normalize(torch.randn(19, 16), dim=1)
        >>> prototype_consistency_loss(s, t, P, kind="kl").backward()
    """
    V.check_float(student, "student")
    V.check_float(teacher, "teacher")
    V.check_float(prototypes, "prototypes")
    student, teacher, prototypes = _autocast(student, teacher, prototypes)
    if student.shape != teacher.shape or student.dim() < 2:
        raise ValueError(f"student and teacher must have the same (N, D) or (B, D, *spatial) "
                         f"shape, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    V.check_same_device("student", student, "teacher", teacher)
    V.check_same_dtype("student", student, "teacher", teacher)
    V.check_prototypes(prototypes, student, "student")
    tau_student = V.temperature(tau_student, "tau_student")
    tau_teacher = V.temperature(tau_teacher, "tau_teacher")
    V.check_reduction(reduction)
    if kind not in ("ce", "kl"):
        raise ValueError(f"kind must be 'ce' or 'kl', got {kind!r}")
    V.check_class_mask(class_mask, prototypes.shape[0], student.device, _batch(student))
    V.check_memory(memory)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor of the spatial shape")
        if mask.shape != spatial(student):
            raise ValueError(f"mask must have shape {tuple(spatial(student))}, got "
                             f"{tuple(mask.shape)}")
        V.check_same_device("mask", mask, "student", student)
    name = dispatch.resolve(("con_fwd", "con_bwd"), backend, student.device)
    if normalize:
        student = _normalized("prototype_consistency_loss", student, name)
        teacher = _normalized("prototype_consistency_loss", teacher.detach(), name)
    tokens = _tau_tokens(tau_student=tau_student, tau_teacher=tau_teacher)
    if isinstance(tau_teacher, Tensor):
        tau_teacher = tau_teacher.detach()  # part of the stop-gradient teacher
    if name == "reference":
        tokens += _finite_tokens(check_finite, student=student, teacher=teacher,
                                 prototypes=prototypes)
        return _plus(reference.prototype_consistency_loss(
            student, teacher, prototypes, tau_student, tau_teacher, mask, class_mask, kind,
            reduction), tokens)
    checks.forbid_transforms("prototype_consistency_loss", name, student, prototypes,
                             tau_student)
    protos, student = _carry_tau_grad(tau_student, prototypes, student)
    keep = None if mask is None else as_bp(mask).contiguous()
    if class_mask is not None:
        some = class_mask.any(-1, keepdim=True) if class_mask.dim() == 2 else class_mask.any()
        keep = (torch.ones(as_bp(student[:, 0]).shape, dtype=torch.bool, device=student.device)
                if keep is None else keep) & some
    ce, ent, _, _, _ = ops.con_fwd(as_bdp(student), as_bdp(teacher.detach()),
                                   protos.contiguous(), _bias(class_mask), keep,
                                   _tau_arg(tau_student), _tau_arg(tau_teacher),
                                   backend=name, check_finite=check_finite,
                                   save_basis=_saved("con", name, student, protos,
                                                     memory) == "basis")
    loss = ce if kind == "ce" else ce - ent
    count = loss.new_tensor(loss.numel()) if keep is None else keep.sum()
    return _plus(reduce(loss, count, reduction, spatial(student)), tokens)


@_shared_doc
def pixel_contrast_loss(feats_q: Tensor, labels_q: Tensor, feats_k: Tensor, labels_k: Tensor,
                        *, tau: float | Tensor = 0.07, ignore_index: int = -100,
                        num_classes: int | None = None, reduction: str = "mean",
                        normalize: bool = False, check_finite: bool = True,
                        backend: str = "auto") -> Tensor:
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
        feats_q, feats_k: ``(B, D, *spatial)`` (spatial sizes may differ), or ``(N, D)`` and
            ``(M, D)`` (one image; ``M`` may differ from ``N``).
        labels_q, labels_k: matching integer labels.
        tau: temperature: @TAU.
        num_classes: number of classes, needed by the fused path for the key-view class
            means; ``None`` infers ``max label + 1`` (a host sync: pass it under
            ``torch.compile``, and for meta tensors, which hold no values).
        reduction: ``"mean"`` (over contributing query pixels) | ``"sum"`` | ``"none"``.
        normalize: queries and keys both: @NORMALIZE.
        check_finite: raise ``ValueError`` on NaN/inf features.
        @COMMON

    @AUTOCAST

    Shape:
        A 0-d float32 loss (float64 for float64 inputs); ``"none"``: the shape of
        ``labels_q``.

    Examples::

        >>> q = F.normalize(torch.randn(2, 16, 6, 6, requires_grad=True), dim=1)
        >>> k = F.normalize(torch.randn(2, 16, 5, 5), dim=1)
        >>> yq, yk = torch.randint(0, 4, (2, 6, 6)), torch.randint(0, 4, (2, 5, 5))
        >>> pixel_contrast_loss(q, yq, k, yk, num_classes=4).backward()
    """
    V.check_float(feats_q, "feats_q")
    V.check_float(feats_k, "feats_k")
    feats_q, feats_k = _autocast(feats_q, feats_k)
    V.check_feats_labels(feats_q, labels_q, "feats_q", "labels_q")
    V.check_feats_labels(feats_k, labels_k, "feats_k", "labels_k")
    V.check_same_device("feats_q", feats_q, "feats_k", feats_k)
    V.check_same_dtype("feats_q", feats_q, "feats_k", feats_k)
    if feats_q.dim() != feats_k.dim() or feats_q.shape[1] != feats_k.shape[1] or (
            feats_q.dim() > 2 and feats_q.shape[0] != feats_k.shape[0]):
        raise ValueError(f"feats_q and feats_k must share the channel dim (and the batch dim "
                         f"for (B, D, *spatial) inputs), got {tuple(feats_q.shape)} and "
                         f"{tuple(feats_k.shape)}")
    tau = V.temperature(tau, "tau")
    V.check_reduction(reduction)
    V.check_ignore_index(ignore_index)
    if num_classes is None:
        if feats_q.device.type == "meta":
            raise ValueError("num_classes=None infers the class count from label values, "
                             "which meta tensors do not hold: pass num_classes")
        seen = torch.cat([labels_q[labels_q != ignore_index].flatten(),
                          labels_k[labels_k != ignore_index].flatten()])
        num_classes = max(int(seen.max()) + 1, 1) if seen.numel() else 1
    _check_num_classes(num_classes)
    V.check_ignore_index(ignore_index, num_classes)
    # the key-view class means run on the same backend: one resolution for all four phases
    name = dispatch.resolve(("pix_fwd", "pix_bwd", "class_sums", "class_sums_bwd"), backend,
                            feats_q.device)
    if normalize:
        feats_q = _normalized("pixel_contrast_loss", feats_q, name)
        feats_k = _normalized("pixel_contrast_loss", feats_k, name)
    tokens = _tau_tokens(tau=tau)
    tq = checks.targets(labels_q, None, num_classes, ignore_index)
    tk = checks.targets(labels_k, None, num_classes, ignore_index)
    if name == "reference":
        tokens += _finite_tokens(check_finite, feats_q=feats_q, feats_k=feats_k)
        return _plus(reference.pixel_contrast_loss(feats_q, tq, feats_k, tk, tau, -1,
                                                   reduction), tokens)
    checks.forbid_transforms("pixel_contrast_loss", name, feats_q, feats_k, tau)
    tq, tk = as_bp(tq), as_bp(tk)
    means, present = _means(*ops.class_sums(as_bdp(feats_k), tk, num_classes, name))
    qvalid = (tq >= 0) & present.gather(1, tq.clamp(min=0))
    q, k = _carry_tau_grad(tau, feats_q, feats_k)
    lse = ops.pix_fwd(as_bdp(q), as_bdp(k), qvalid, tk >= 0, _tau_arg(tau), backend=name,
                      check_finite=check_finite)
    pos_mean = means.gather(1, tq.clamp(min=0).unsqueeze(-1).expand(-1, -1, means.shape[-1]))
    with _exact(feats_q.device):
        pos = torch.einsum("bdp,bpd->bp", as_bdp(feats_q).to(means.dtype), pos_mean) / tau
    loss = torch.where(qvalid, lse - pos, 0.0)
    return _plus(reduce(loss, qvalid.sum(), reduction, labels_q.shape), tokens)


@_shared_doc
def pseudo_label(feats: Tensor, prototypes: Tensor, *, threshold: float = 0.8,
                 class_mask: Tensor | None = None, ignore_index: int = -100,
                 backend: str = "auto") -> tuple[Tensor, Tensor]:
    r"""Pseudo-labels for unlabelled pixels (paper Eq. 10), in one streaming pass.

    ``score_i = max_k f_i . P_k`` over allowed classes (raw similarity, no temperature, not
    a softmax probability); ``label_i = argmax_k`` (lowest index on ties) when
    ``score_i >= threshold``, else ``ignore_index``. No gradient.

    Args:
        feats: ``(B, D, *spatial)`` or ``(N, D)``.
        prototypes: ``(C, D)``, same dtype.
        threshold: a finite real number.
        class_mask: optional bool ``(C,)`` or per-image ``(B, C)``: the classes that may be
            chosen (an image with none gets ``ignore_index`` and score ``-inf``).
        @COMMON

    @AUTOCAST

    Shape:
        ``labels`` int64 and ``scores`` float32, both of the spatial shape
        (``(B, *spatial)``, or ``(N,)`` for ``(N, D)`` input).

    Examples::

        >>> f = F.normalize(torch.randn(2, 16, 8, 8), dim=1)
        >>> labels, scores = pseudo_label(f, F.normalize(torch.randn(5, 16), dim=1),
        ...                               threshold=-1.0)  # a cosine is >= -1: all kept
        >>> labels.shape, bool((labels >= 0).all())
        (torch.Size([2, 8, 8]), True)
    """
    V.check_float(feats, "feats")
    V.check_float(prototypes, "prototypes")
    feats, prototypes = _autocast(feats, prototypes)
    if feats.dim() < 2:
        raise ValueError(f"feats must be (N, D) or (B, D, *spatial), got {tuple(feats.shape)}")
    V.check_prototypes(prototypes, feats)
    V.check_threshold(threshold)
    V.check_ignore_index(ignore_index, prototypes.shape[0])
    V.check_class_mask(class_mask, prototypes.shape[0], feats.device, _batch(feats))
    name = dispatch.resolve(("pseudo_label",), backend, feats.device)
    if name == "reference":
        return reference.pseudo_label(feats.detach(), prototypes.detach(), threshold,
                                      class_mask, ignore_index)
    labels, scores = ops.pseudo_label(as_bdp(feats.detach()), prototypes.detach().contiguous(),
                                      _bias(class_mask), float(threshold),
                                      ignore_index=ignore_index, backend=name)
    return labels.reshape(spatial(feats)), scores.reshape(spatial(feats))
