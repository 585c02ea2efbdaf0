"""Semantic segmentation metrics, computed the MMSegmentation way.

Intersection and union are accumulated per class over the whole split (not averaged per
image); pixels whose ground truth is ``ignore_index`` count nowhere (not even as a wrong
prediction); a class absent from both prediction and ground truth has IoU ``nan`` and is left
out of the mean.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class IoUMeter:
    """Accumulates ``(C, C)`` confusion counts ``conf[gt, pred]`` over batches.

    ``update(pred, gt)``: ``pred`` and ``gt`` int tensors of the same shape, ``pred`` in
    ``[0, C)``, ``gt`` in ``[0, C)`` or ``ignore_index``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, gt: Tensor) -> None:
        if pred.shape != gt.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")
        c = self.num_classes
        keep = gt != self.ignore_index
        p, g = pred[keep].long().cpu(), gt[keep].long().cpu()
        if p.numel() and (int(g.min()) < 0 or int(g.max()) >= c):
            raise ValueError(f"ground truth holds ids outside [0, {c}) and != {self.ignore_index}")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= c):
            raise ValueError(f"predictions hold ids outside [0, {c})")
        self.conf += torch.bincount(g * c + p, minlength=c * c).view(c, c)

    def iou(self) -> Tensor:
        """Per-class IoU ``(C,)`` float64: ``TP / (TP + FP + FN)``, ``nan`` where
        ``TP + FP + FN = 0``."""
        conf = self.conf.double()
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def miou(self) -> float:
        """``nanmean`` of :meth:`iou` (``nan`` if every class is absent)."""
        return float(self.iou().nanmean())

    def accuracy(self) -> float:
        """Overall pixel accuracy over the non-ignored pixels."""
        total = int(self.conf.sum())
        return float(self.conf.diag().sum()) / total if total else math.nan

    def table(self, names: list[str]) -> str:
        """Markdown table of per-class IoU (percent), then mIoU and pixel accuracy."""
        if len(names) != self.num_classes:
            raise ValueError(f"got {len(names)} names for {self.num_classes} classes")
        lines = ["| class | IoU (%) | GT pixels |", "| --- | ---: | ---: |"]
        gt = self.conf.sum(1)
        for n, v, k in zip(names, self.iou().tolist(), gt.tolist()):
            lines.append(f"| {n} | {'nan' if math.isnan(v) else f'{100 * v:.2f}'} | {k} |")
        lines.append(f"| **mIoU** | **{100 * self.miou():.2f}** | |")
        lines.append(f"| aAcc | {100 * self.accuracy():.2f} | {int(gt.sum())} |")
        return "\n".join(lines)
