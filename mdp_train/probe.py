"""Held-out nearest-prototype probe: how well an encoder's pixel embeddings separate each
dataset's classes on images the loop never trains on.

Each labelled dataset contributes ``held`` images (left out of training) and ``support``
images (training images). An image is resized so its short side is ``size`` (no crop, no
colour augmentation) and its labels are taken at the feature resolution. A pixel's
prediction is its nearest prototype (highest cosine) among its own dataset's classes; the
score is the balanced pixel accuracy (mean per-class recall over the classes present in the
held-out labels), so chance is ``1 / K`` for ``K`` candidate classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transforms import normalize

CHUNK = 16  # images per eval forward


def _prepare(img: Tensor, lbl: Tensor, size: int) -> tuple[Tensor, Tensor]:
    h, w = img.shape[1:]
    s = size / min(h, w)
    hw = (max(1, round(h * s)), max(1, round(w * s)))
    x = F.interpolate(img[None].float() / 255, hw, mode="bilinear", align_corners=False,
                      antialias=True)[0]
    return normalize(x), lbl


class Probe:
    """Args:
        datasets, space: the labelled datasets and their :class:`LabelSpace` (dataset ``d``
            owns global classes ``offsets[d] .. offsets[d] + sizes[d] - 1``).
        held, support: per dataset index, the image indices to score and to build the
            support prototypes from.
        size: short side of the probe images.
    """

    def __init__(self, datasets, space, held: dict[int, list[int]],
                 support: dict[int, list[int]], size: int):
        self.space = space
        self.sets: dict[int, dict[str, list]] = {}
        for d, ds in enumerate(datasets):
            if d not in held:
                continue
            self.sets[d] = {}
            for part, idx in (("held", held[d]), ("support", support[d])):
                pairs = []
                for i in idx:
                    img, lbl = ds.load(i)
                    pairs.append(_prepare(img, space.to_global(d, lbl), size))
                self.sets[d][part] = pairs

    @torch.no_grad()
    def features(self, model: nn.Module, head: str, part: str = "held") -> dict[int, list]:
        """``{dataset: [(feats (D, h, w), labels (h, w)), ...]}`` from ``model`` (an
        :class:`MDPNet`) in eval mode (its BN running statistics); the mode is restored."""
        mode = model.training
        model.eval()
        dev = next(model.parameters()).device
        out = {}
        try:
            for d, parts in self.sets.items():
                rows, pairs = [], parts[part]
                for i in range(0, len(pairs), CHUNK):
                    chunk = pairs[i:i + CHUNK]
                    shapes = {x.shape for x, _ in chunk}
                    xs = ([torch.stack([x for x, _ in chunk])] if len(shapes) == 1
                          else [x[None] for x, _ in chunk])  # batch same-size images
                    fs = torch.cat([model(x.to(dev))[head].float() for x in xs])
                    for f, (_, y) in zip(fs, chunk):
                        y = F.interpolate(y[None, None].double(), f.shape[1:],
                                          mode="nearest-exact")[0, 0].long().to(dev)
                        rows.append((f, y))
                out[d] = rows
        finally:
            model.train(mode)
        return out

    def class_means(self, model: nn.Module, head: str) -> tuple[Tensor, Tensor]:
        """Support prototypes: per class, the normalised mean of the support pixels' features
        (``(C, D)``, valid ``(C,)``)."""
        c = self.space.num_classes
        sums, counts = None, None
        for rows in self.features(model, head, "support").values():
            for f, y in rows:
                if sums is None:
                    sums = f.new_zeros(c, f.shape[0])
                    counts = f.new_zeros(c)
                keep = y >= 0
                sums.index_add_(0, y[keep], f.permute(1, 2, 0)[keep])
                counts.index_add_(0, y[keep], torch.ones_like(y[keep], dtype=f.dtype))
        return F.normalize(sums, dim=1), counts > 0

    def score(self, feats: dict[int, list], protos: Tensor, valid: Tensor) -> dict[int, dict]:
        """``{dataset: {"acc": balanced accuracy, "chance": 1 / K}}`` for the datasets with
        at least one valid prototype."""
        out = {}
        for d, rows in feats.items():
            lo, n = self.space.offsets[d], self.space.sizes[d]
            cand = (valid[lo:lo + n].nonzero().flatten() + lo).to(protos.device)
            if cand.numel() == 0:
                continue
            hit = torch.zeros(self.space.num_classes)
            tot = torch.zeros(self.space.num_classes)
            p = protos[cand].float()
            for f, y in rows:
                keep = y >= 0
                pred = cand[torch.einsum("dn,kd->kn", f[:, keep], p).argmax(0)]
                t = y[keep]
                tot.index_add_(0, t.cpu(), torch.ones(t.numel()))
                hit.index_add_(0, t.cpu(), (pred == t).float().cpu())
            present = tot > 0
            if bool(present.any()):
                out[d] = {"acc": float((hit[present] / tot[present]).mean()),
                          "chance": 1.0 / cand.numel()}
        return out
