"""Segmentation datasets in their real on-disk layouts.

Every reader lists ``(image, label)`` file pairs at construction (a missing label file is an
error naming it) and decodes one pair per ``load(i)``: ``image`` ``(3, H, W)`` uint8 and
``label`` ``(H, W)`` int64 in the dataset's own ids ``[0, len(classes))`` or ``IGNORE``
(255). Unlabelled readers return ``label=None``. Corrupt files and label values outside the
taxonomy raise ``DataError`` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import classes as K

IGNORE = 255
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """Bad input data; the message names the file."""


def read_image(path: str | Path) -> torch.Tensor:
    """RGB image as ``(3, H, W)`` uint8."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_label(path: str | Path) -> torch.Tensor:
    """Single-channel label map (palette indices for palette PNGs) as ``(H, W)`` int64."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"label images must be single-channel, got mode {im.mode}")
            arr = np.asarray(im)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read label {path}: {e}") from e
    return torch.from_numpy(arr.astype(np.int64))


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} directory {path} does not exist")
    return path


class SegDataset:
    """Base reader: ``pairs`` of (image path, label path or None) and a class list."""

    name = "dataset"
    classes: tuple[str, ...] | list[str] = ()

    def __init__(self, pairs: list[tuple[Path, Path | None]], root: str | Path):
        if not pairs:
            raise DataError(f"no images found under {root}")
        self.pairs, self.root = pairs, Path(root)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def labelled(self) -> bool:
        return self.pairs[0][1] is not None

    def convert(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw label file values -> dataset ids (identity by default)."""
        return raw

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        img_path, lbl_path = self.pairs[i]
        img = read_image(img_path)
        if lbl_path is None:
            return img, None
        lbl = self.convert(read_label(lbl_path))
        if lbl.shape != img.shape[1:]:
            raise DataError(f"label {lbl_path} is {tuple(lbl.shape)} but its image is "
                            f"{tuple(img.shape[1:])}")
        bad = (lbl != IGNORE) & ((lbl < 0) | (lbl >= len(self.classes)))
        if bool(bad.any()):
            raise DataError(f"label {lbl_path} holds value {int(lbl[bad][0])} outside the "
                            f"{len(self.classes)} classes of {self.name} (ignore is {IGNORE})")
        return img, lbl

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root}, {len(self)} images, {len(self.classes)} classes)"


def _pairs_from_list(ids: list[str], img_fmt: str, lbl_fmt: str) -> list[tuple[Path, Path]]:
    pairs = []
    for i in ids:
        img, lbl = Path(img_fmt.format(i)), Path(lbl_fmt.format(i))
        for p in (img, lbl):
            if not p.is_file():
                raise DataError(f"missing file {p}")
        pairs.append((img, lbl))
    return pairs


class VOC(SegDataset):
    """Pascal VOC 2012 (``root`` = ``VOCdevkit/VOC2012``): ``JPEGImages/<id>.jpg``,
    ``SegmentationClass/<id>.png`` (palette PNG), ids from ``ImageSets/Segmentation/
    <split>.txt``. ``aug=True`` reads the SBD-augmented ``SegmentationClassAug`` labels (and
    by default the ``train_aug`` list). 21 classes, 255 = border/ignore."""

    name, classes = "voc", K.VOC

    def __init__(self, root: str | Path, split: str | None = None, aug: bool = False):
        root = Path(root)
        split = split or ("train_aug" if aug else "train")
        lst = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not lst.is_file():
            raise DataError(f"missing split file {lst}")
        ids = [ln.split()[0] for ln in lst.read_text().splitlines() if ln.strip()]
        ldir = root / ("SegmentationClassAug" if aug else "SegmentationClass")
        super().__init__(_pairs_from_list(ids, str(root / "JPEGImages" / "{}.jpg"),
                                          str(ldir / "{}.png")), root)


class ADE20K(SegDataset):
    """ADE20K scene parsing (``root`` = ``ADEChallengeData2016``): ``images/<split>/*.jpg``
    and ``annotations/<split>/*.png``. Label 0 ("other") becomes ignore; 1..150 shift down to
    0..149."""

    name, classes = "ade20k", K.ADE20K

    def __init__(self, root: str | Path, split: str = "training"):
        root = Path(root)
        imgs = sorted(_need_dir(root / "images" / split, "ADE20K image").glob("*.jpg"))
        adir = _need_dir(root / "annotations" / split, "ADE20K annotation")
        super().__init__(_pairs_from_list([p.stem for p in imgs], str(root / "images" / split /
                                          "{}.jpg"), str(adir / "{}.png")), root)

    def convert(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.where(raw == 0, IGNORE, raw - 1)


class Cityscapes(SegDataset):
    """Cityscapes (``root`` holds ``leftImg8bit`` and ``gtFine``):
    ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png`` (19 train ids, 255 ignore)."""

    name, classes = "cityscapes", K.CITYSCAPES

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        idir = _need_dir(root / "leftImg8bit" / split, "Cityscapes image")
        imgs = sorted(idir.glob("*/*_leftImg8bit.png"))
        ids = [str(p.relative_to(idir))[: -len("_leftImg8bit.png")] for p in imgs]
        super().__init__(_pairs_from_list(
            ids, str(idir / "{}_leftImg8bit.png"),
            str(root / "gtFine" / split / "{}_gtFine_labelTrainIds.png")), root)


class COCOStuff(SegDataset):
    """COCO-Stuff 164k with converted stuffthingmaps (``root`` holds ``images`` and
    ``annotations``): ``images/<split>/<id>.jpg`` and
    ``annotations/<split>/<id>_labelTrainIds.png`` (171 train ids, 255 ignore)."""

    name, classes = "coco_stuff", K.COCO_STUFF

    def __init__(self, root: str | Path, split: str = "train2017"):
        root = Path(root)
        imgs = sorted(_need_dir(root / "images" / split, "COCO-Stuff image").glob("*.jpg"))
        super().__init__(_pairs_from_list(
            [p.stem for p in imgs], str(root / "images" / split / "{}.jpg"),
            str(root / "annotations" / split / "{}_labelTrainIds.png")), root)


def read_classes(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"missing class list {path}")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not names:
        raise DataError(f"class list {path} is empty")
    return names


class Folder(SegDataset):
    """Generic folder format: ``classes.txt`` (one class per line, in id order) and
    ``images/<name>.<ext>`` with ``labels/<name>.png`` (8-bit ids, 255 = void), either
    directly under ``root`` or in sub-folders (``<root>/<subset>/images``, as CamVid's
    sequences); ``subsets`` picks some of those sub-folders."""

    def __init__(self, root: str | Path, subsets: list[str] | None = None,
                 name: str | None = None):
        root = Path(root)
        self.classes = read_classes(root / "classes.txt")
        self.name = name or root.name
        if subsets is not None:
            dirs = [_need_dir(root / s, "subset") for s in subsets]
        elif (root / "images").is_dir():
            dirs = [root]
        else:
            dirs = sorted(d for d in root.iterdir() if (d / "images").is_dir())
        pairs = []
        for d in dirs:
            for img in sorted(_need_dir(d / "images", "image").iterdir()):
                if img.suffix.lower() in IMAGE_EXTS:
                    lbl = d / "labels" / f"{img.stem}.png"
                    if not lbl.is_file():
                        raise DataError(f"missing file {lbl}")
                    pairs.append((img, lbl))
        super().__init__(pairs, root)


class ImageFolder(SegDataset):
    """Unlabelled images: every image file under ``root`` (recursively)."""

    classes = ()

    def __init__(self, root: str | Path, name: str | None = None):
        root = Path(_need_dir(Path(root), "image"))
        self.name = name or root.name
        files = sorted(Path(dp) / f for dp, _, fs in os.walk(root) for f in fs
                       if f.lower().endswith(IMAGE_EXTS))
        super().__init__([(f, None) for f in files], root)


READERS = {"voc": VOC, "ade20k": ADE20K, "cityscapes": Cityscapes, "coco_stuff": COCOStuff,
           "folder": Folder, "images": ImageFolder}
FRAME_HALVES = ("first_half", "second_half")


def frame_range(n: int, frames, where: str = "dataset") -> range:
    """The indices ``frames`` selects among a reader's ``n`` pairs (in the reader's sorted
    order, e.g. a video drive's frames in time order): ``"first_half"`` = the first
    ``n // 2``, ``"second_half"`` = the rest (the two are disjoint and cover all ``n``), or
    ``[start, stop]`` = ``start <= i < stop``. Anything else is a ``DataError`` naming
    ``where``."""
    if frames == "first_half":
        return range(0, n // 2)
    if frames == "second_half":
        return range(n // 2, n)
    if isinstance(frames, str):
        raise DataError(f"{where}: frames must be one of {FRAME_HALVES} or [start, stop], "
                        f"got {frames!r}")
    ok = (isinstance(frames, (list, tuple)) and len(frames) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in frames))
    if not ok:
        raise DataError(f"{where}: frames must be one of {FRAME_HALVES} or [start, stop] "
                        f"(two ints), got {frames!r}")
    start, stop = frames
    if not 0 <= start < stop <= n:
        raise DataError(f"{where}: frames [{start}, {stop}] must satisfy 0 <= start < stop <= "
                        f"{n} (the reader has {n} images)")
    return range(start, stop)


def build_dataset(spec: dict) -> SegDataset:
    """``{"type": "voc", "root": ..., <reader kwargs>}`` -> reader (``remap`` is handled by
    :class:`~mdp_train.labels.LabelSpace`). ``frames`` (optional, any reader) keeps a subset
    of the reader's sorted pairs (:func:`frame_range`): e.g. the two halves of one drive, one
    labelled and one read as unlabelled images (``type: images``, whose labels are never
    opened)."""
    spec = {k: v for k, v in spec.items() if k != "remap"}
    kind = spec.pop("type", None)
    frames = spec.pop("frames", None)
    if kind not in READERS:
        raise ValueError(f"dataset type must be one of {sorted(READERS)}, got {kind!r}")
    ds = READERS[kind](**spec)
    if frames is not None:
        keep = frame_range(len(ds), frames, f"dataset {ds.name!r} ({ds.root})")
        ds.pairs = [ds.pairs[i] for i in keep]
    return ds
