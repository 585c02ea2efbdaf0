"""``mdp-train demo``: MDP pretraining on two generated datasets whose taxonomies have a known
correspondence, sized to a time budget, ending with what the embeddings learnt.

Every image is a noisy background with a few shapes, each filled with one of four colours,
90 degrees of hue apart (the views' hue jitter is +-36 degrees). The VOC-layout set labels a
shape by its colour (red = person, chartreuse = cat, cyan = car, violet = dog; background =
VOC's background, 255 on the borders); the ADE-layout set labels the same kind of images by
a coarsening of the colour (red, chartreuse = ADE's "fireplace"; cyan, violet = ADE's
"water"; background 0 = ignore). Nothing tells the loop that the two taxonomies are
related: the alignment score at the end measures whether the embeddings found it (each
class's nearest prototype in the other dataset is its counterpart).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import config
from .trainer import Trainer

COLOURS = np.array([[220, 40, 40], [130, 220, 40], [40, 200, 200], [130, 40, 220]],
                   np.float32)  # hue 0, 90, 180, 270
VOC_IDS = (15, 8, 7, 12)     # person, cat, car, dog: one per colour
TONE = (0, 0, 1, 1)          # the coarse class of each colour
ADE_IDS = (50, 22)           # ADE file values (class + 1): "fireplace" (warm), "water" (cool)
FINE = ("voc/person", "voc/cat", "voc/car", "voc/dog")
COARSE = ("ade20k/fireplace", "ade20k/water")


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy background with 1-3 discs/boxes: (image uint8, colour map: -1 or 0..3)."""
    yy, xx = np.mgrid[:size, :size]
    img = 120 + 30 * rng.standard_normal((size, size, 3)) + rng.uniform(-40, 40, 3)
    cmap = np.full((size, size), -1)
    for _ in range(int(rng.integers(1, 4))):
        c = int(rng.integers(4))
        cy, cx = rng.integers(size // 6, 5 * size // 6, 2)
        r = int(rng.integers(size // 8, size // 4))
        dy, dx = np.abs(yy - cy), np.abs(xx - cx)
        m = dy ** 2 + dx ** 2 <= r * r if rng.random() < 0.5 else (dy <= r) & (dx <= r)
        cmap[m] = c
        img[m] = COLOURS[c] + 20 * rng.standard_normal((int(m.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8), cmap


def write_demo_data(root: str | Path, n: int = 64, size: int = 64, seed: int = 0) -> dict:
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
        img, cmap = _scene(rng, size)
        lbl = np.where(cmap >= 0, np.array(VOC_IDS)[cmap], 0).astype(np.uint8)
        m = cmap >= 0
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
        img, cmap = _scene(rng, size)
        lbl = np.where(cmap >= 0, np.array(ADE_IDS)[np.array(TONE)[cmap.clip(0)]], 0)
        name = f"ADE_train_{i:08d}"
        Image.fromarray(img).save(ade / "images" / "training" / f"{name}.jpg", quality=92)
        Image.fromarray(lbl.astype(np.uint8)).save(ade / "annotations" / "training" / f"{name}.png")
    return {"voc": {"type": "voc", "root": str(voc)},
            "ade20k": {"type": "ade20k", "root": str(ade)}}


def demo_config(root: str | Path, out: str | Path, steps: int = 300, n: int = 64) -> dict:
    specs = write_demo_data(root, n)
    return config.merge(config.DEFAULTS, {
        "data": {"datasets": list(specs.values()), "crop_size": 48, "crop_scale": [0.4, 1.0],
                 "workers": 0},
        "model": {"arch": "resnet18", "width": 16, "channels": 32, "dim": 32, "momentum": 0.99},
        "train": {"batch_size": 8, "steps": steps, "out": str(out), "log_every": 10,
                  "probe_every": max(1, steps // 4), "probe_fraction": 0.25,
                  "save_every": 10 ** 9, "resume": None, "progress": False},
        "optim": {"lr": 0.4, "ref_batch": 64}})


def centred(protos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Valid prototypes minus their mean, renormalised (raw cosines between prototypes are
    dominated by a shared offset); invalid rows stay 0."""
    p = protos.float().clone()
    p[valid] = torch.nn.functional.normalize(p[valid] - p[valid].mean(0), dim=1)
    return p


def alignment(protos: torch.Tensor, names: list[str]) -> tuple[float, list[str]]:
    """Fraction of the demo's classes whose nearest prototype (cosine of ``protos``, e.g.
    :func:`centred` ones) among the other dataset's classes is the known counterpart (a
    colour: its coarse class; a coarse class: one of its colours), and one line per class."""
    idx = {n: i for i, n in enumerate(names)}
    p = protos.float()
    lines, hits = [], 0
    pairs = [(f, [COARSE[TONE[k]]], COARSE) for k, f in enumerate(FINE)]
    pairs += [(c, [f for k, f in enumerate(FINE) if TONE[k] == t], FINE)
              for t, c in enumerate(COARSE)]
    for cls, want, others in pairs:
        sims = {o: float(p[idx[cls]] @ p[idx[o]]) for o in others}
        near = max(sims, key=sims.get)
        hits += near in want
        lines.append(f"  {cls:<13} nearest {near:<13} {sims[near]:+.2f}  "
                     f"({'ok' if near in want else 'expected ' + ' or '.join(want)})")
    return hits / len(pairs), lines


def plot(protos: torch.Tensor, valid: torch.Tensor, names: list[str], path: Path) -> Path:
    """Cosine similarity matrices of the demo's class prototypes, raw and centred (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cls = list(FINE) + list(COARSE) + ["voc/background"]
    idx = [names.index(c) for c in cls]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), dpi=110)
    fig.subplots_adjust(left=0.12, right=0.88, bottom=0.24, top=0.92, wspace=0.5)
    for ax, p, title in ((axes[0], protos.float(), "raw"),
                         (axes[1], centred(protos, valid), "centred (minus the mean prototype)")):
        p = p[idx]
        sim = (p @ p.t()).cpu().numpy()
        im = ax.imshow(sim, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(cls)), cls, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(cls)), cls, fontsize=7)
        for i in range(len(cls)):
            for j in range(len(cls)):
                ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"bank prototype cosine, {title}", fontsize=8)
    fig.colorbar(im, ax=axes, fraction=0.025)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def size_steps(cfg: dict, seconds: float, probe_share: float = 0.15) -> int:
    """Steps that fit ``seconds``: times a few steps of a throwaway trainer (after one
    warm-up step) and leaves ``probe_share`` of the budget for the probes and set-up."""
    tr = Trainer(cfg)
    it = iter(tr.loader())
    tr.train_step(next(it))
    t0 = time.time()
    for _ in range(4):
        tr.train_step(next(it))
    per = (time.time() - t0) / 4
    return max(8, int(seconds * (1 - probe_share) / per))


def main(seconds: float = 120.0, out: str | None = None, n: int = 64,
         steps: int | None = None) -> dict:
    """Run the demo in about ``seconds`` (or exactly ``steps`` steps); the PNG goes to
    ``out`` (default ``out/demo``). Returns the table, the alignment score and the PNG."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="mdp-demo-") as tmp:
        run = Path(out) if out else Path(tmp) / "run"
        cfg = demo_config(Path(tmp) / "data", run, n=n)
        sized = steps is None
        if sized:
            steps = size_steps(dict(cfg, train=dict(cfg["train"], probe_every=0)),
                               seconds - (time.time() - start))
        cfg["train"].update(steps=steps, probe_every=max(1, steps // 4))
        trainer = Trainer(cfg)
        names = trainer.space.names
        print(f"label space: {len(names)} classes (voc/* at offset {trainer.space.offsets[0]}, "
              f"ade20k/* at offset {trainer.space.offsets[1]}); {len(trainer.data)} training "
              f"images, 25% of each set held out for the probe")
        how = (f"sized to the {seconds:.0f} s budget" if sized else "as asked")
        print(f"ResNet-18 DeepLab-v3+ (width 16), batch 8, crops 48 px: {steps} steps {how} "
              f"(the cosine schedule runs to its end) on {trainer.device}")

        def show(m: dict) -> None:
            if m["step"] % max(1, steps // 10) == 0 or "probe" in m:
                pr = "  ".join(f"{d} {r['support']:.2f}" for d, r in m.get("probe", {}).items())
                print(f"step {m['step']:4d}  loss {m.get('loss', float('nan')):.4f}  "
                      f"lr {m.get('lr', 0):.4f}  {m.get('time', 0):.0f} s"
                      + (f"  probe: {pr}" if pr else ""), flush=True)

        hist = trainer.fit(on_step=show)
        probes = [h for h in hist if "probe" in h]
        first, last = probes[0]["probe"], probes[-1]["probe"]
        print(f"\nheld-out nearest-prototype balanced pixel accuracy (eval mode, step "
              f"{probes[0]['step']} -> {probes[-1]['step']} of {trainer.total}):")
        print(f"| dataset | init | end | end (bank prototypes) | chance |")
        print("| --- | ---: | ---: | ---: | ---: |")
        table = {}
        for ds, row in last.items():
            table[ds] = {"init": first[ds]["support"], "end": row["support"],
                         "bank": row.get("bank"), "chance": row["chance"]}
            print(f"| {ds} | {first[ds]['support']:.3f} | {row['support']:.3f} | "
                  f"{row.get('bank', float('nan')):.3f} | {row['chance']:.3f} |")
        protos, valid = trainer.criterion.bank.prototypes()
        score, lines = alignment(centred(protos, valid), names)
        print(f"\ncross-dataset alignment: {score:.2f} of the classes have their known "
              f"counterpart as nearest prototype (centred cosine) in the other dataset "
              f"(colour <-> coarse colour)")
        print("\n".join(lines))
        png = plot(protos, valid, names, Path(out or "out/demo") / "prototypes.png")
        print(f"\nprototype similarity matrix: {png}")
        print(f"total {time.time() - start:.0f} s")
    return {"table": table, "alignment": score, "png": str(png), "steps": steps,
            "total": trainer.total, "step": trainer.step}
