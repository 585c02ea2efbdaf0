"""``mdp-train demo``: writes two small generated datasets with different taxonomies in the real
VOC and ADE20K layouts and pretrains a ResNet-18 DeepLab-v3+ on both for about two minutes.

The VOC-layout set labels each shape by its colour (person/cat/car/dog, background 0, a
255 border); the ADE-layout set labels the same kind of images by the shape's form
(ball/box/flag, background 0 = "other" = ignore). Nothing maps one taxonomy to the other.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from . import config
from .trainer import Trainer

COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230], [230, 220, 30]], np.float32)
VOC_IDS = (15, 8, 7, 12)        # person, cat, car, dog: one per colour
ADE_IDS = (120, 42, 150)        # ball, box, flag (ADE file values = class + 1): one per form


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Noisy background with one shape: (image uint8, shape mask, colour, form)."""
    yy, xx = np.mgrid[:size, :size]
    img = 110 + 25 * rng.standard_normal((size, size, 3)) + rng.uniform(-40, 40, 3)
    colour, form = int(rng.integers(4)), int(rng.integers(3))
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    r = int(rng.integers(size // 6, size // 3))
    dy, dx = np.abs(yy - cy), np.abs(xx - cx)
    if form == 0:
        m = dy ** 2 + dx ** 2 <= r * r
    elif form == 1:
        m = (dy <= r) & (dx <= r)
    else:
        m = ((dy <= r // 3) | (dx <= r // 3)) & (dy <= r) & (dx <= r)
    img[m] = COLOURS[colour] + 15 * rng.standard_normal((int(m.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8), m, colour, form


def write_demo_data(root: str | Path, n: int = 48, size: int = 96, seed: int = 0) -> dict:
    """Write the VOC-layout and ADE-layout sets under ``root``; returns their dataset specs."""
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    ade = Path(root) / "ADEChallengeData2016"
    for d in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation",
              ade / "images" / "training", ade / "annotations" / "training"):
        d.mkdir(parents=True, exist_ok=True)
    palette = list(rng.integers(0, 256, 768).astype(np.uint8))
    ids = []
    for i in range(n):
        img, m, colour, _ = _scene(rng, size)
        lbl = np.where(m, VOC_IDS[colour], 0).astype(np.uint8)
        edge = m ^ (np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        lbl[edge] = 255
        name = f"2007_{i:06d}"
        Image.fromarray(img).save(voc / "JPEGImages" / f"{name}.jpg", quality=92)
        p = Image.fromarray(lbl)
        p.putpalette(palette)  # VOC labels are palette PNGs: L + palette -> P, same indices
        p.save(voc / "SegmentationClass" / f"{name}.png")
        ids.append(name)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    for i in range(n):
        img, m, _, form = _scene(rng, size)
        name = f"ADE_train_{i:08d}"
        Image.fromarray(img).save(ade / "images" / "training" / f"{name}.jpg", quality=92)
        Image.fromarray(np.where(m, ADE_IDS[form], 0).astype(np.uint8)).save(
            ade / "annotations" / "training" / f"{name}.png")
    return {"voc": {"type": "voc", "root": str(voc)},
            "ade20k": {"type": "ade20k", "root": str(ade)}}


def demo_config(root: str | Path, out: str | Path) -> dict:
    specs = write_demo_data(root)
    return config.load(None, [
        f"data.datasets={list(specs.values())}", "data.crop_size=64", "data.crop_scale=[0.5,1.0]",
        "data.workers=1", "model.arch=resnet18", "model.width=16", "model.channels=32",
        "model.dim=64", "model.momentum=0.99", "train.batch_size=8", "train.steps=300",
        "optim.lr=0.8", "optim.ref_batch=64", f"train.out={out}", "train.log_every=5",
        "train.save_every=100", "train.resume=null", "train.progress=false"])


def main(seconds: float = 120.0, out: str | None = None) -> Trainer:
    with tempfile.TemporaryDirectory(prefix="mdp-demo-") as tmp:
        cfg = demo_config(Path(tmp) / "data", out or Path(tmp) / "run")
        trainer = Trainer(cfg)
        names = trainer.space.names
        print(f"label space: {len(names)} classes (voc/* at offset {trainer.space.offsets[0]}, "
              f"ade20k/* at offset {trainer.space.offsets[1]}), {len(trainer.data)} images")
        print(f"ResNet-18 DeepLab-v3+ (width 16), batch 8, crops 64 px; training for "
              f"~{seconds:.0f} s on {trainer.device}")
        def show(m: dict) -> None:
            if m["step"] % 10 == 0:
                print(f"step {m['step']:4d}  loss {m['loss']:.4f}  class {m['class']:.4f}  "
                      f"con {m['con']:.4f}  lr {m['lr']:.4f}  {m['time']:.0f} s", flush=True)

        hist = trainer.fit(max_seconds=seconds, on_step=show)
        first = [h["loss"] for h in hist[:10]]
        last = [h["loss"] for h in hist[-10:]]
        print(f"loss: first 10 steps {np.mean(first):.4f} -> last 10 steps {np.mean(last):.4f}")
        print(trainer.summary())
    return trainer
