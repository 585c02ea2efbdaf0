"""``PrototypeContrastLoss``: the drop-in MDP loss module (bank + class loss + consistency)."""
from __future__ import annotations

import math

from torch import Tensor, nn

from . import checks, dispatch, validation as V
from .bank import PrototypeBank
from .functional import prototype_consistency_loss, prototype_contrast_loss


def _temperature(value, name: str):
    """``V.temperature``, with a tensor's value also checked now: construction is eager, so
    a bad tensor temperature fails here rather than at the first forward."""
    value = V.temperature(value, name)
    if isinstance(value, Tensor):
        checks.check_positive(value, name)
    return value


class PrototypeContrastLoss(nn.Module):
    r"""MDP's pixel-to-prototype loss with its own prototype bank.

    ``forward`` pools the key features into a new bank slot, reads the (L2-normalised)
    prototypes and the classes the bank has seen with that slot included, and returns

    .. math:: L = L_{class} + \alpha L_{con}

    where ``L_class`` is :func:`prototype_contrast_loss` (with mixing when ``labels_b`` and
    ``lam`` are given) over the valid classes and ``L_con`` is
    :func:`prototype_consistency_loss` (only when both ``con_student`` and ``con_teacher``
    are given). The slot is committed only after the loss is computed: a call that raises
    (bad shapes, labels, NaN features, ...) leaves the bank bit-identical. The parts of the
    last call are in ``last_terms`` (detached).

    Args:
        num_classes: size of the concatenated label space.
        dim: embedding size.
        tau, tau_student, tau_teacher: temperatures (positive numbers, or 0-d tensors: an
            ``nn.Parameter`` makes a learnable temperature).
        bank_images, batch_size: the bank remembers ``max(1, bank_images // batch_size)``
            batches.
        alpha: weight of the consistency term (finite, >= 0).
        ignore_index: label of pixels with no target (default -100; not a class).
        backend: as the functional ops; checked here, at construction.
        check_finite: refuse NaN/inf features (query, key and consistency inputs).

    Shape:
        - ``feats``, ``key_feats``, ``con_student``, ``con_teacher``: ``(B, D, *spatial)``
          (or ``(N, D)``); ``labels``, ``key_labels``, ``labels_b``, ``con_mask``:
          ``(B, *spatial)`` (or ``(N,)``); ``lam``: a number or ``(B,)``; ``class_mask``:
          ``(C,)`` or ``(B, C)`` bool.
        - Output: a 0-d loss (float32; float64 for float64 inputs).

    Examples::

        >>> crit = PrototypeContrastLoss(num_classes=342, dim=16, bank_images=64,
        ...                              batch_size=2)
        >>> f = F.normalize(torch.randn(2, 16, 8, 8, requires_grad=True), dim=1)
        >>> y = torch.randint(0, 342, (2, 8, 8))
        >>> crit(f, y).backward()
        >>> int(crit.bank.num_updates)
        1
    """

    def __init__(self, num_classes: int, dim: int = 256, *, tau: float = 0.07,
                 bank_images: int = 10240, batch_size: int = 128, alpha: float = 0.2,
                 tau_student: float = 0.07, tau_teacher: float = 0.04,
                 ignore_index: int = -100, backend: str = "auto", check_finite: bool = True):
        super().__init__()
        V.check_positive_int(bank_images, "bank_images")
        V.check_positive_int(batch_size, "batch_size")
        self.tau = _temperature(tau, "tau")
        self.tau_student = _temperature(tau_student, "tau_student")
        self.tau_teacher = _temperature(tau_teacher, "tau_teacher")
        if not V._real(alpha) or not 0 <= alpha < math.inf:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        dispatch.check_runnable(backend)
        self.bank = PrototypeBank(num_classes, dim, max(1, bank_images // batch_size),
                                  ignore_index=ignore_index, backend=backend)
        self.alpha = float(alpha)
        self.ignore_index, self.backend, self.check_finite = ignore_index, backend, check_finite
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, feats: Tensor, labels: Tensor, key_feats: Tensor | None = None, *,
                key_labels: Tensor | None = None, labels_b: Tensor | None = None,
                lam: float | Tensor | None = None, con_student: Tensor | None = None,
                con_teacher: Tensor | None = None, con_mask: Tensor | None = None,
                class_mask: Tensor | None = None) -> Tensor:
        """
        Args:
            feats: ``(B, D, *spatial)`` query embeddings (mixed view when mixing).
            labels: ``(B, *spatial)`` targets of ``feats`` (``a`` when mixing).
            key_feats, key_labels: the (unmixed) key view that updates the bank; default
                ``feats.detach()`` and ``labels``.
            labels_b, lam: mixing targets and ratio (see :func:`prototype_contrast_loss`).
            con_student, con_teacher, con_mask: consistency inputs
                (see :func:`prototype_consistency_loss`).
            class_mask: optional bool ``(C,)`` or per-image ``(B, C)`` (e.g. each image's
                dataset's classes), combined with the classes the bank holds, for both
                terms.
        """
        if (con_student is None) != (con_teacher is None):
            raise ValueError("consistency needs both con_student and con_teacher (or neither)")
        V.check_float(feats, "feats")
        V.check_class_mask(class_mask, self.bank.num_classes, feats.device,
                           feats.shape[0] if feats.dim() > 2 else 1)
        slot = self.bank.slot(feats.detach() if key_feats is None else key_feats,
                              labels if key_labels is None else key_labels,
                              check_finite=self.check_finite,
                              name="feats" if key_feats is None else "key_feats")
        protos, valid = self.bank.prototypes(pending=slot)
        allowed = valid if class_mask is None else class_mask & valid
        l_class = prototype_contrast_loss(
            feats, protos.to(feats.dtype), labels, tau=self.tau,
            ignore_index=self.ignore_index, class_mask=allowed, labels_b=labels_b, lam=lam,
            check_finite=self.check_finite, backend=self.backend)
        terms = {"class": l_class.detach(), "valid_classes": valid.sum()}
        loss = l_class
        if con_student is not None:
            l_con = prototype_consistency_loss(
                con_student, con_teacher, protos.to(con_student.dtype),
                tau_student=self.tau_student, tau_teacher=self.tau_teacher, mask=con_mask,
                class_mask=allowed, check_finite=self.check_finite, backend=self.backend)
            terms["con"] = l_con.detach()
            loss = loss + self.alpha * l_con
        self.bank.commit(*slot, after=(loss.detach(),))
        self.last_terms = terms
        return loss
