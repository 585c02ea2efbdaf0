"""``mdp-train visualize``: t-SNE of pixel embeddings coloured by class (paper Fig. 4) and, for
fine-tuned models, prediction overlays (image | ground truth | prediction), as PNG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .datasets import IGNORE
from .finetune import SegNet, predict, preload, read_checkpoint, split_dataset
from .model import MDPNet
from .transforms import normalize
from .tsne import tsne


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` distinct colours in [0, 1] (matplotlib's tab20, dark shades first so that
    neighbouring ids differ in hue, then hsv)."""
    import matplotlib
    base = matplotlib.colormaps["tab20"](np.r_[0:20:2, 1:20:2])[:, :3]
    if n <= 20:
        return base[:n]
    return np.concatenate([base, matplotlib.colormaps["hsv"](np.linspace(0, 1, n - 20,
                                                                        endpoint=False))[:, :3]])


def load_embedder(path: str | Path):
    """``(fn(x) -> (B, D, h, w) pixel embeddings, fine-tuned SegNet or None, description)``:
    a fine-tuned model embeds with its decoder output, a pretrained one with its contrastive
    (``proj``) head, or the decoder when it has none (the cross-entropy baseline)."""
    ck = read_checkpoint(path)
    if ck["kind"] == "finetune":
        model = SegNet(len(ck["classes"]), **ck["arch"])
        model.load_state_dict(ck["state"])
        model.eval()
        return model.features, model, "decoder features"
    if ck["kind"] != "pretrain":
        raise ValueError(f"{path}: t-SNE needs a pretraining or fine-tuning checkpoint, "
                         f"not a bare backbone")
    m = ck["cfg"]["model"]
    heads = tuple(sorted({k.split(".")[1] for k in ck["state"] if k.startswith("heads.")}))
    ncls = ck["state"]["heads.cls.weight"].shape[0] if "cls" in heads else None
    net = MDPNet(m["arch"], m["output_stride"], m["width"], m["channels"], m["dim"], heads, ncls)
    net.load_state_dict(ck["state"])
    net.eval()
    if "proj" in heads:
        return (lambda x: net(x)["proj"]), None, "proj-head embeddings"
    return net.net, None, "decoder features"


@torch.no_grad()
def pixel_embeddings(embed, pairs, points: int, scale: float, seed: int = 0
                     ) -> tuple[Tensor, Tensor]:
    """Sample up to ``points`` labelled pixels (at most ``points / #classes`` per class, then
    filled at random) from the embedding maps of ``pairs``: ``(features (N, D), labels (N,))``."""
    feats, labels = [], []
    for img, lbl in pairs:
        h, w = img.shape[1:]
        x = normalize(img.float() / 255)[None]
        x = F.interpolate(x, (round(h * scale), round(w * scale)), mode="bilinear",
                          align_corners=False, antialias=True)
        f = embed(x)[0]
        y = F.interpolate(lbl[None, None].double(), f.shape[1:], mode="nearest-exact")[0, 0]
        keep = y.long() != IGNORE
        feats.append(f.permute(1, 2, 0)[keep])
        labels.append(y.long()[keep])
    f, y = torch.cat(feats), torch.cat(labels)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    f, y = f[perm], y[perm]
    cls = y.unique()
    cap = max(1, points // len(cls))
    rank = torch.zeros_like(y)
    for c in cls:  # position of each pixel among its class's pixels
        m = y == c
        rank[m] = torch.arange(int(m.sum()))
    take = (rank < cap).nonzero().flatten()
    rest = (rank >= cap).nonzero().flatten()[: max(0, points - len(take))]
    idx = torch.cat([take, rest])[:points]
    return f[idx].float(), y[idx]


def plot_tsne(emb: Tensor, labels: Tensor, names: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = palette(len(names))
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    e, y = emb.numpy(), labels.numpy()
    for c in np.unique(y):
        m = y == c
        ax.scatter(e[m, 0], e[m, 1], s=3, color=cols[c], label=f"{names[c]} ({int(m.sum())})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.legend(markerscale=4, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def colourise(lbl: Tensor, cols: np.ndarray) -> np.ndarray:
    """``(H, W)`` ids -> ``(H, W, 3)`` colours (ignore = black)."""
    out = np.zeros((*lbl.shape, 3))
    y = lbl.numpy()
    for c in range(len(cols)):
        out[y == c] = cols[c]
    return out


def plot_overlays(model: SegNet, pairs, names: list[str], path: Path, scale: float,
                  alpha: float = 0.55) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = palette(len(names))
    fig, axes = plt.subplots(len(pairs), 3, figsize=(9, 2.3 * len(pairs)), dpi=100,
                             squeeze=False)
    for row, (img, lbl) in zip(axes, pairs):
        im = img.permute(1, 2, 0).numpy() / 255
        pred = predict(model, img, scale)
        ok = lbl != IGNORE
        acc = float((pred[ok] == lbl[ok]).float().mean()) if bool(ok.any()) else float("nan")
        panels = [(im, "image"), ((1 - alpha) * im + alpha * colourise(lbl, cols), "ground truth"),
                  ((1 - alpha) * im + alpha * colourise(pred, cols), f"prediction (acc {acc:.2f})")]
        for ax, (p, t) in zip(row, panels):
            ax.imshow(p.clip(0, 1))
            ax.set_title(t, fontsize=8)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cols[c]) for c in range(len(names))]
    fig.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def visualize(ckpt: str | Path, data: str | Path, out: str | Path, subsets=None, prefix=None,
              points: int = 2000, images: int = 4, scale: float = 0.5, seed: int = 0,
              perplexity: float = 30.0, iters: int = 750) -> list[Path]:
    """Write ``<out>/tsne.png`` (and ``<out>/overlays.png`` for a fine-tuned model) for the
    labelled images of a Folder dataset; returns the written paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = split_dataset(data, subsets, prefix)
    names = list(ds.classes)
    pairs = preload(ds)
    embed, model, what = load_embedder(ckpt)
    f, y = pixel_embeddings(embed, pairs, points, scale, seed)
    emb = tsne(f, perplexity=perplexity, iters=iters, seed=seed)
    written = [out / "tsne.png"]
    plot_tsne(emb, y, names, written[0], f"t-SNE of {len(y)} pixel {what}: {Path(ckpt).name}")
    if model is not None and images > 0:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(pairs), generator=g)[:images].tolist()
        written.append(out / "overlays.png")
        plot_overlays(model, [pairs[i] for i in sorted(pick)], names, written[1], scale)
    return written
