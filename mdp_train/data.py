"""The pretraining data pipeline: every dataset in one index, sampled regardless of origin,
each sample turned into two views plus the teacher view with labels in the ``LabelSpace``."""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset, Sampler

from .labels import LabelSpace
from .transforms import make_views


class PretrainData(Dataset):
    """Items are addressed by ``(index, seed)``: the seed alone fixes the sample's
    augmentations, so views are reproducible in any worker and after a resume.

    Each item: ``view1``, ``view2``, ``teacher`` ``(3, S, S)``, ``label1``, ``label2``
    ``(S, S)`` global ids (``space.ignore_index`` where unlabelled/ignored), ``dataset``
    (index into ``datasets``) and ``labelled``.
    """

    def __init__(self, datasets: Sequence, space: LabelSpace, crop_size: int,
                 crop_scale=(0.2, 1.0)):
        self.datasets, self.space = list(datasets), space
        self.crop_size, self.crop_scale = crop_size, tuple(crop_scale)
        self.index = [(d, i) for d, ds in enumerate(self.datasets) for i in range(len(ds))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        k, seed = key
        d, i = self.index[k]
        img, lbl = self.datasets[d].load(i)
        lbl = self.space.to_global(d, lbl, tuple(img.shape[1:]))
        g = torch.Generator().manual_seed(seed)
        out = make_views(img, lbl, self.crop_size, g, self.crop_scale)
        out["dataset"] = d
        out["labelled"] = self.datasets[d].labelled
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
