"""``LabelSpace``: the concatenation of several datasets' taxonomies (paper section 3.2).

Dataset ``d`` with ``C_d`` classes owns global ids ``[offset_d, offset_d + C_d)``; no class is
merged with another dataset's. Ignore stays ignore: every dataset's ignore value (255) maps to
``LabelSpace.ignore_index`` (-1, because 342 concatenated classes do not fit below 255).

An optional remap file per dataset coarsens its taxonomy first, one ``source: target`` line per
source class (``#`` starts a comment)::

    sky: sky
    building: construction
    fence: construction
    sign_symbol: ignore

``source`` is a class name or id of the dataset; ``target`` names a coarse class (coarse ids
follow first appearance) or is ``ignore``. Every source class must be listed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .datasets import IGNORE, DataError


def read_remap(path: str | Path, classes: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Parse a remap file for a dataset with ``classes`` -> (coarse class names, lookup
    ``(len(classes),)`` int64 from fine id to coarse id or ``IGNORE``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing remap file {path}")
    index = {c: i for i, c in enumerate(classes)}
    lut = torch.full((len(classes),), -2, dtype=torch.int64)
    coarse: list[str] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        src, sep, dst = (s.strip() for s in line.rpartition(":"))
        if not sep or not src or not dst:
            raise DataError(f"{path}:{n}: expected 'source: target', got {line!r}")
        i = int(src) if src.isdigit() and src not in index else index.get(src)
        if i is None or not 0 <= i < len(classes):
            raise DataError(f"{path}:{n}: {src!r} is not a class of this dataset")
        if lut[i] != -2:
            raise DataError(f"{path}:{n}: class {classes[i]!r} is mapped twice")
        if dst == "ignore":
            lut[i] = IGNORE
        else:
            if dst not in coarse:
                coarse.append(dst)
            lut[i] = coarse.index(dst)
    missing = [classes[i] for i in (lut == -2).nonzero().flatten().tolist()]
    if missing:
        raise DataError(f"{path} does not map the classes {missing}")
    return coarse, lut


class LabelSpace:
    """Concatenated label space of ``datasets`` (objects with ``name`` and ``classes``; an
    unlabelled dataset has no classes and adds none).

    Args:
        datasets: the datasets, in order (their order fixes the offsets).
        remaps: optional per-dataset remap file paths (``None`` = keep the taxonomy).

    Attributes:
        names: global class names, ``"<dataset>/<class>"``.
        offsets: first global id of each dataset.
        num_classes: total number of classes ``C``.
    """

    ignore_index = -1

    def __init__(self, datasets: Sequence, remaps: Sequence[str | Path | None] | None = None):
        remaps = list(remaps) if remaps is not None else [None] * len(datasets)
        if len(remaps) != len(datasets):
            raise ValueError(f"got {len(remaps)} remaps for {len(datasets)} datasets")
        self.names: list[str] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.dataset_names: list[str] = []
        self._luts: list[torch.Tensor] = []
        for ds, remap in zip(datasets, remaps):
            fine = list(ds.classes)
            if remap is not None:
                cls, lut = read_remap(remap, fine)
            else:
                cls, lut = fine, torch.arange(len(fine))
            off = len(self.names)
            # Lookup over raw values 0..255: class ids shift by the offset, ignore -> -1.
            full = torch.full((IGNORE + 1,), -2, dtype=torch.int64)
            full[IGNORE] = self.ignore_index
            full[: len(lut)] = torch.where(lut == IGNORE, self.ignore_index, lut + off)
            self._luts.append(full)
            self.offsets.append(off)
            self.sizes.append(len(cls))
            self.dataset_names.append(ds.name)
            self.names += [f"{ds.name}/{c}" for c in cls]
        self.num_classes = len(self.names)

    def __len__(self) -> int:
        return self.num_classes

    def class_masks(self) -> torch.Tensor:
        """(datasets, C) bool: row d marks dataset d's classes (none for a dataset without
        classes)."""
        masks = torch.zeros(len(self.offsets), self.num_classes, dtype=torch.bool)
        for d, (off, size) in enumerate(zip(self.offsets, self.sizes)):
            masks[d, off:off + size] = True
        return masks

    def to_global(self, dataset: int, label: torch.Tensor | None,
                  shape: tuple[int, int] | None = None) -> torch.Tensor:
        """Dataset-local ids (``[0, C_d)`` or 255) -> global ids (or ``ignore_index``).
        ``label=None`` (unlabelled image) gives an all-ignore map of ``shape``."""
        if label is None:
            return torch.full(shape, self.ignore_index, dtype=torch.int64)
        lut = self._luts[dataset]
        bad = (label < 0) | (label > IGNORE)
        if bool(bad.any()) or bool((lut[label.clamp(0, IGNORE)] == -2).any()):
            raise ValueError(f"labels of dataset {self.dataset_names[dataset]!r} hold values "
                             f"outside its taxonomy")
        return lut[label]

    def dataset_of(self, cls: int) -> int:
        """Index of the dataset that owns global class ``cls``."""
        if not 0 <= cls < self.num_classes:
            raise ValueError(f"class {cls} is outside [0, {self.num_classes})")
        return next(d for d, (o, n) in enumerate(zip(self.offsets, self.sizes))
                    if o <= cls < o + n)
