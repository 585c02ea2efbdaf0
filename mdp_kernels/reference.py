"""The ``reference`` backend: the math of every op in plain PyTorch.

It materialises the full logit matrices, works in float64, and differentiates by autograd.
It is the ground truth the fused backends are tested against, not a fast path, and imports
nothing of ours: its layouts and reductions are written here, independently of the fused
path's (``layout.py``). Inputs are assumed validated by ``mdp_kernels.functional``.
Low-precision inputs do their products in their own dtype and everything after in float32,
as an eager low-precision user would.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor



def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_bdp(x: Tensor) -> Tensor:
    """(N, D) -> (1, D, N); (B, D, *spatial) -> (B, D, P). A view whenever possible."""
    return x.t().unsqueeze(0) if x.dim() == 2 else x.flatten(2)


def as_bp(labels: Tensor) -> Tensor:
    """(N,) -> (1, N); (B, *spatial) -> (B, P)."""
    return labels.unsqueeze(0) if labels.dim() == 1 else labels.flatten(1)


def _pixels(x: Tensor) -> Tensor:
    return as_bdp(x).transpose(1, 2)  # (B, P, D)


def _per_image(class_mask: Tensor) -> Tensor:
    """A (C,) or (B, C) class mask as (1 or B, 1, C), to broadcast over (B, P, C) logits."""
    return class_mask.reshape(-1, 1, class_mask.shape[-1])


def normalize(x: Tensor) -> Tensor:
    """``F.normalize(x, dim=1)``: each pixel's embedding over its channel dim."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)


def _logits(f: Tensor, protos: Tensor, tau: float, class_mask: Tensor | None) -> Tensor:
    z = (f @ protos.t()).to(acc_dtype(f.dtype)) / tau
    if class_mask is not None:
        z = z.masked_fill(~_per_image(class_mask), float("-inf"))
    return z


def _target_valid(labels: Tensor, num_classes: int, ignore_index: int,
                  class_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(valid, index): index is the label clamped into [0, C) so it can be gathered."""
    index = labels.clamp(0, num_classes - 1).long()
    valid = labels != ignore_index
    if class_mask is not None:
        rows = class_mask.expand(index.shape[0], -1) if class_mask.dim() == 1 else class_mask
        valid = valid & rows.gather(1, index)
    return valid, index


def _mean(total: Tensor, norm: Tensor) -> Tensor:
    """total / norm, and 0 (with zero gradient) where norm is 0."""
    some = norm > 0
    return torch.where(some, total, 0.0) / torch.where(some, norm, 1)


def reduce(per_pixel: Tensor, norm: Tensor, reduction: str, shape) -> Tensor:
    if reduction == "none":
        return per_pixel.reshape(shape)
    total = per_pixel.sum()
    return total if reduction == "sum" else _mean(total, norm)


def class_embedding_sums(feats, labels, num_classes, ignore_index=-100):
    # Ignored pixels go to an extra class that is dropped: no data-dependent shapes, so the
    # reference also runs on meta and fake tensors.
    f = _pixels(feats).to(acc_dtype(feats.dtype))
    y = as_bp(labels)
    b, p, d = f.shape
    c1 = num_classes + 1
    cls = torch.where(y == ignore_index, num_classes, y.clamp(0, num_classes - 1)).long()
    index = (torch.arange(b, device=y.device)[:, None] * c1 + cls).flatten()
    sums = f.new_zeros(b * c1, d).index_add(0, index, f.reshape(b * p, d))
    counts = torch.zeros(b * c1, dtype=torch.int64, device=y.device).index_add(
        0, index, torch.ones_like(index))
    return sums.view(b, c1, d)[:, :num_classes], counts.view(b, c1)[:, :num_classes]


def masked_average_pool(feats, labels, num_classes, ignore_index=-100):
    sums, counts = class_embedding_sums(feats, labels, num_classes, ignore_index)
    present = counts > 0
    return sums / counts.clamp(min=1).unsqueeze(-1).to(sums.dtype), present


def prototype_contrast_loss(feats, prototypes, labels, tau=0.07, ignore_index=-100,
                            class_mask=None, labels_b=None, lam=None, reduction="mean",
                            weight=None, label_smoothing=0.0):
    """``F.cross_entropy(z, y, weight=, label_smoothing=, ignore_index=)`` on the masked
    logits, the uniform part of the smoothing over the allowed classes; with mixing, each
    target's term with its own weights and normaliser."""
    f = _pixels(feats)
    c = prototypes.shape[0]
    z = _logits(f, prototypes, tau, class_mask)  # (B, P, C)
    valid_a, ia = _target_valid(as_bp(labels), c, ignore_index, class_mask)
    any_valid = valid_a
    if labels_b is not None:
        valid_b, ib = _target_valid(as_bp(labels_b), c, ignore_index, class_mask)
        any_valid = valid_a | valid_b
    # Rows of pixels with no target are zeroed so that an all-masked row gives no NaN.
    lse = torch.logsumexp(torch.where(any_valid[..., None], z, 0.0), dim=-1)
    w = None if weight is None else weight.to(z.dtype)
    if label_smoothing:
        allowed = (torch.ones(1, 1, c, dtype=torch.bool, device=z.device) if class_mask is None
                   else _per_image(class_mask))
        wk = torch.ones(c, dtype=z.dtype, device=z.device) if w is None else w
        nll_all = lse[..., None] - torch.where(allowed, z, 0.0)
        smooth = (torch.where(allowed, wk * nll_all, 0.0).sum(-1)
                  / allowed.sum(-1).clamp(min=1))

    def term(valid, index):
        """Per-pixel loss of one target, and its normaliser."""
        nll = lse - z.gather(-1, index[..., None]).squeeze(-1)
        wt = torch.ones_like(nll) if w is None else w[index]
        per = wt * nll
        if label_smoothing:
            per = (1 - label_smoothing) * per + label_smoothing * smooth
        return torch.where(valid, per, 0.0), torch.where(valid, wt, 0.0).sum()

    la, na = term(valid_a, ia)
    if labels_b is None:
        return reduce(la, na, reduction, labels.shape)
    lb, nb = term(valid_b, ib)
    return mix_reduce(la, na, lb, nb, lam, reduction, labels.shape)


def mix_reduce(la: Tensor, na: Tensor, lb: Tensor, nb: Tensor, lam, reduction: str,
               shape) -> Tensor:
    """Eq. 6: lam_i * l(i, a_i) + (1 - lam_i) * l(i, b_i); "mean" divides each term by its
    own normaliser (valid pixels, or their targets' weights), as two
    ``cross_entropy(..., ignore_index)`` calls would."""
    lam_px = torch.as_tensor(lam, dtype=la.dtype, device=la.device).reshape(-1, 1)
    wa, wb = lam_px * la, (1 - lam_px) * lb
    if reduction == "none":
        return (wa + wb).reshape(shape)
    if reduction == "sum":
        return (wa + wb).sum()
    return _mean(wa.sum(), na) + _mean(wb.sum(), nb)


def prototype_consistency_loss(student, teacher, prototypes, tau_student=0.07,
                               tau_teacher=0.04, mask=None, class_mask=None, kind="ce",
                               reduction="mean"):
    zs = _logits(_pixels(student), prototypes, tau_student, class_mask)
    with torch.no_grad():
        t = torch.softmax(_logits(_pixels(teacher), prototypes, tau_teacher, class_mask), -1)
    s = torch.log_softmax(zs, -1)
    if class_mask is not None:  # masked classes have t = 0 and s = -inf: drop them
        s = s.masked_fill(~_per_image(class_mask), 0.0)
    loss = -(t * s).sum(-1)
    if kind == "kl":
        loss = loss + torch.special.xlogy(t, t).sum(-1)
    keep = torch.ones_like(loss, dtype=torch.bool) if mask is None else as_bp(mask)
    if class_mask is not None:  # an image with no allowed class contributes nothing
        keep = keep & _per_image(class_mask).any(-1)
    loss = torch.where(keep, loss, 0.0)
    return reduce(loss, keep.sum(), reduction, student.shape[:1] + student.shape[2:])


def pixel_contrast_loss(feats_q, labels_q, feats_k, labels_k, tau=0.07, ignore_index=-100,
                        reduction="mean"):
    """Eq. 1 written out: the positive term averages q_i . k_j / tau over matching keys."""
    q, k = _pixels(feats_q), _pixels(feats_k)
    yq, yk = as_bp(labels_q), as_bp(labels_k)
    z = (q @ k.transpose(1, 2)).to(acc_dtype(q.dtype)) / tau  # (B, P, Pk)
    kvalid = (yk != ignore_index)[:, None, :]
    zk = torch.where(kvalid.any(-1, keepdim=True), z.masked_fill(~kvalid, float("-inf")), z)
    lse = torch.logsumexp(zk, -1)
    same = (yq[..., None] == yk[:, None, :]) & kvalid
    n_pos = same.sum(-1)
    pos = z.masked_fill(~same, 0.0).sum(-1) / n_pos.clamp(min=1)
    valid = (yq != ignore_index) & (n_pos > 0)
    loss = torch.where(valid, lse - pos, 0.0)
    return reduce(loss, valid.sum(), reduction, labels_q.shape)


@torch.no_grad()
def pseudo_label(feats, prototypes, threshold=0.8, class_mask=None, ignore_index=-100):
    s = _logits(_pixels(feats), prototypes, 1.0, class_mask)
    scores, labels = s.max(-1)
    labels = torch.where(scores >= threshold, labels, ignore_index)
    shape = feats.shape[:1] + feats.shape[2:]
    return labels.reshape(shape), scores.float().reshape(shape)


def bank_slot(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    present = counts > 0
    means = sums / counts.clamp(min=1).unsqueeze(-1).to(sums.dtype)
    return (means * present.unsqueeze(-1)).sum(0), present.sum(0).to(sums.dtype)


def bank_prototypes(sums: Tensor, counts: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    n = counts.sum(0)
    valid = n > 0
    protos = sums.sum(0) / n.clamp(min=1).unsqueeze(-1)
    if normalize:
        protos = F.normalize(protos, dim=-1)
    return protos * valid.unsqueeze(-1), valid
