"""Tiny datasets written in each real on-disk layout, and a tiny pretraining config, for the
mdp_train tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mdp_train import config


def _img(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(arr, path: Path, palette: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if palette:  # an L image with a palette becomes a P image with the same indices
        im.putpalette(list(range(256)) * 3)
    im.save(path)


def blocks(rng, h, w, values):
    """Label map of 4 quadrant blocks with values drawn from ``values``."""
    lbl = np.empty((h, w), np.uint8)
    v = rng.choice(values, 4)
    lbl[: h // 2, : w // 2], lbl[: h // 2, w // 2:] = v[0], v[1]
    lbl[h // 2:, : w // 2], lbl[h // 2:, w // 2:] = v[2], v[3]
    return lbl


def write_voc(root: Path, n=6, h=40, w=48, seed=0, aug=False) -> Path:
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    ids = [f"2008_{i:06d}" for i in range(n)]
    for i in ids:
        _save(_img(rng, h, w), voc / "JPEGImages" / f"{i}.jpg")
        lbl = blocks(rng, h, w, [0, 1, 15, 20, 255])
        _save(lbl, voc / ("SegmentationClassAug" if aug else "SegmentationClass") / f"{i}.png",
              palette=not aug)
    lst = voc / "ImageSets" / "Segmentation" / ("train_aug.txt" if aug else "train.txt")
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text("\n".join(ids) + "\n")
    return voc


def write_ade(root: Path, n=6, h=36, w=44, seed=1) -> Path:
    rng = np.random.default_rng(seed)
    ade = root / "ADEChallengeData2016"
    for i in range(n):
        _save(_img(rng, h, w), ade / "images" / "training" / f"ADE_train_{i:08d}.jpg")
        _save(blocks(rng, h, w, [0, 1, 2, 150]),
              ade / "annotations" / "training" / f"ADE_train_{i:08d}.png")
    return ade


def write_cityscapes(root: Path, n=3, h=32, w=64, seed=2) -> Path:
    rng = np.random.default_rng(seed)
    cs = root / "cityscapes"
    for i in range(n):
        city = "aachen" if i % 2 == 0 else "bremen"
        name = f"{city}_{i:06d}_000019"
        _save(_img(rng, h, w), cs / "leftImg8bit" / "train" / city / f"{name}_leftImg8bit.png")
        _save(blocks(rng, h, w, [0, 13, 18, 255]),
              cs / "gtFine" / "train" / city / f"{name}_gtFine_labelTrainIds.png")
    return cs


def write_coco_stuff(root: Path, n=3, h=40, w=40, seed=3) -> Path:
    rng = np.random.default_rng(seed)
    cs = root / "coco_stuff164k"
    for i in range(n):
        name = f"{i:012d}"
        _save(_img(rng, h, w), cs / "images" / "train2017" / f"{name}.jpg")
        _save(blocks(rng, h, w, [0, 79, 170, 255]),
              cs / "annotations" / "train2017" / f"{name}_labelTrainIds.png")
    return cs


def write_folder(root: Path, n=4, h=32, w=40, seed=4, subsets=("seqA", "seqB"),
                 classes=("sky", "road", "car")) -> Path:
    rng = np.random.default_rng(seed)
    f = root / "folder"
    f.mkdir(parents=True, exist_ok=True)
    (f / "classes.txt").write_text("\n".join(classes) + "\n")
    for s in subsets:
        for i in range(n):
            _save(_img(rng, h, w), f / s / "images" / f"{s}_{i:03d}.jpg")
            _save(blocks(rng, h, w, list(range(len(classes))) + [255]),
                  f / s / "labels" / f"{s}_{i:03d}.png")
    return f


def write_images(root: Path, n=4, h=40, w=40, seed=5) -> Path:
    rng = np.random.default_rng(seed)
    u = root / "unlabelled"
    for i in range(n):
        _save(_img(rng, h, w), u / ("a" if i % 2 else "b") / f"u{i}.png")
    return u


def tiny_config(root: Path, out: Path, *extra: str, unlabelled: bool = False) -> dict:
    """ResNet-18 (width 8) DeepLab-v3+ on a VOC-layout + ADE-layout set, 32 px crops."""
    specs = [{"type": "voc", "root": str(write_voc(root))},
             {"type": "ade20k", "root": str(write_ade(root))}]
    unl = [{"type": "images", "root": str(write_images(root))}] if unlabelled else []
    return config.load(None, [
        f"data.datasets={specs}", f"data.unlabelled={unl}", "data.crop_size=32",
        "data.workers=0", "model.arch=resnet18", "model.width=8", "model.channels=16",
        "model.dim=16", "model.momentum=0.9", "train.batch_size=4", "train.steps=5",
        "optim.lr=0.1", "optim.ref_batch=4", f"train.out={out}", "train.log_every=1",
        "train.save_every=100", "train.progress=false", *extra])
