"""The pretraining data pipeline: every dataset in one index, sampled regardless of origin,
each sample turned into two views plus the teacher view with labels in the ``LabelSpace``."""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset, Sampler

from .labels import LabelSpace
from .transforms import make_views


class HiddenLabels:
    """A labelled dataset read as unlabelled: training never sees its labels; they only
    score the pseudo-labels. ``target`` is the index of the labelled dataset whose taxonomy
    (and remap) the labels are in."""

    classes: tuple = ()
    labelled = False

    def __init__(self, ds, target: int):
        self.ds, self.target, self.name = ds, target, ds.name

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, i: int):
        return self.ds.load(i)


def held_out(n: int, fraction: float, seed: int = 0) -> list[int]:
    """A fixed ``fraction`` (at least one image) of ``n`` indices, the same for every run
    seed, so probes of different runs use the same images."""
    if not 0 < fraction < 1:
        raise ValueError(f"train.probe_fraction must be in (0, 1), got {fraction}")
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(f"holding out {k} of {n} images leaves none to train on")
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


class PretrainData(Dataset):
    """Items are addressed by ``(index, seed)``: the seed alone fixes the sample's
    augmentations, so views are reproducible in any worker and after a resume.

    Each item: ``view1``, ``view2``, ``teacher`` ``(3, S, S)``, ``label1``, ``label2``
    ``(S, S)`` global ids (``space.ignore_index`` where unlabelled/ignored), ``dataset``
    (index into ``datasets``) and ``labelled``; when some dataset is a
    :class:`HiddenLabels`, also ``hidden1``, ``hidden2`` (its labels, ignore elsewhere).
    ``exclude`` maps a dataset index to image indices left out (the probe's held-out split).
    """

    def __init__(self, datasets: Sequence, space: LabelSpace, crop_size: int,
                 crop_scale=(0.2, 1.0), exclude: dict[int, list[int]] | None = None):
        self.datasets, self.space = list(datasets), space
        self.crop_size, self.crop_scale = crop_size, tuple(crop_scale)
        skip = {d: set(v) for d, v in (exclude or {}).items()}
        self.index = [(d, i) for d, ds in enumerate(self.datasets) for i in range(len(ds))
                      if i not in skip.get(d, ())]
        self.hidden = any(isinstance(ds, HiddenLabels) for ds in self.datasets)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        k, seed = key
        d, i = self.index[k]
        ds = self.datasets[d]
        img, lbl = ds.load(i)
        hid = isinstance(ds, HiddenLabels)
        lbl = self.space.to_global(ds.target if hid else d, lbl, tuple(img.shape[1:]))
        g = torch.Generator().manual_seed(seed)
        out = make_views(img, lbl, self.crop_size, g, self.crop_scale)
        if self.hidden:
            none = torch.full_like(out["label1"], self.space.ignore_index)
            for v in ("1", "2"):
                out["hidden" + v] = out["label" + v] if hid else none
                if hid:
                    out["label" + v] = none
        out["dataset"] = d
        out["labelled"] = ds.labelled
        return out


class StepSampler(Sampler):
    """Yields, for steps ``start .. total - 1``, this rank's share of the global batch.

    Epoch ``e`` is a permutation of all samples seeded by ``(seed, e)``; step ``s`` takes
    global batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` (the last partial
    batch is dropped) and rank ``r`` of ``w`` takes its items ``r::w`` (a
    DistributedSampler-like split). Each item comes with a per-sample augmentation seed.
    """

    def __init__(self, n: int, batch: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 start: int = 0, total: int = 1):
        if batch % world:
            raise ValueError(f"the global batch {batch} must be divisible by {world} ranks")
        if n < batch:
            raise ValueError(f"the datasets hold {n} images, fewer than one batch of {batch}")
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.start, self.total = start, total
        self.steps_per_epoch = n // batch

    def step_keys(self, step: int) -> list[tuple[int, int]]:
        epoch, j = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + epoch))
        idx = perm[j * self.batch:(j + 1) * self.batch].tolist()
        base = (self.seed * 1_000_003 + step) * self.batch
        return [(k, base + p) for p, k in enumerate(idx)][self.rank::self.world]

    def __iter__(self):
        for s in range(self.start, self.total):
            yield self.step_keys(s)

    def __len__(self) -> int:
        return max(0, self.total - self.start)
