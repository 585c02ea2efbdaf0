"""Downstream fine-tuning and evaluation: DeepLab-v3+ with a per-pixel classifier trained by
cross-entropy on one dataset, from scratch, from an MDP pretraining checkpoint or from an
exported (torchvision-layout) backbone; full fine-tuning or a fixed backbone (paper Table 6).

Checkpoints written here (``kind: "finetune"``) hold ``model`` (``net.*`` = the DeepLab-v3+,
same names as :class:`~mdp_train.model.MDPNet`'s ``net``, and ``cls.*``), ``arch`` (the
constructor arguments), ``classes`` and the training options.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import files
from .datasets import IGNORE, Folder
from .metrics import IoUMeter
from .model import DeepLabV3Plus
from .transforms import normalize

ARCH_KEYS = ("arch", "output_stride", "width", "channels")


def _opt(default, help: str, flag: str | None = None, **kw):
    """A config field: its default, and its command-line help (and flag, when not
    ``--<name>``)."""
    make = dict(default_factory=lambda: list(default)) if isinstance(default, list) else dict(
        default=default)
    return field(**make, metadata=dict(help=help, flag=flag, **kw))


@dataclass
class FinetuneConfig:
    """Everything ``finetune`` (and ``mdp-train finetune``, whose flags are made from these
    fields) takes; the defaults live here only. ``arch``/``output_stride``/``width``/
    ``channels`` are taken from ``init`` when it is an mdp_train checkpoint."""
    data: str = _opt(None, "Folder-format dataset root", required=True)
    out: str = _opt(None, "run folder (model.pt, result.json, eval.md)", required=True)
    subsets: list | None = _opt(None, "sub-folders to train on (default: all)", nargs="*")
    prefix: str | None = _opt(None, "train on images whose name starts with this (train_)")
    eval_subsets: list | None = _opt(None, "evaluate on these sub-folders", nargs="*")
    eval_prefix: str | None = _opt(None, "evaluate on images starting with this (test_)")
    init: str | None = _opt(None, "pretraining/fine-tuning checkpoint or exported backbone "
                            "(default: from scratch)")
    scope: str = _opt("all", "what a checkpoint transfers: the whole DeepLab-v3+ or the "
                      "ResNet", choices=("all", "backbone"))
    freeze_backbone: bool = _opt(False, "fixed backbone (paper Table 6)")
    arch: str = _opt("resnet18", "ResNet depth")
    output_stride: int = _opt(16, "DeepLab-v3+ output stride")
    width: int = _opt(64, "ResNet base width")
    channels: int = _opt(256, "ASPP / decoder channels")
    steps: int = _opt(1000, "SGD steps")
    batch_size: int = _opt(8, "images per step")
    lr: float = _opt(0.01, "learning rate (poly schedule, power 0.9)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "SGD weight decay")
    crop: list = _opt([96, 128], "training crop", nargs=2, metavar=("H", "W"), type=int)
    scale: list = _opt([0.4, 0.7], "random resize range while training", "--train-scale",
                       nargs=2, metavar=("LO", "HI"), type=float)
    eval_scale: float = _opt(0.5, "inference resize factor")
    seed: int = _opt(0, "seed of the initialisation, crops and order")
    progress: bool = _opt(True, "progress bar", "--no-progress")

    @classmethod
    def from_dict(cls, opts: dict) -> "FinetuneConfig":
        """The defaults updated by ``opts``; an unknown key is a ``KeyError`` naming it."""
        unknown = set(opts) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise KeyError(f"unknown fine-tuning options {sorted(unknown)}")
        cfg = cls(**opts)
        if cfg.data is None or cfg.out is None:
            raise ValueError("fine-tuning needs data and out")
        return cfg

    @classmethod
    def add_arguments(cls, parser) -> None:
        """One command-line flag per field, with its default and help."""
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            flag = meta.pop("flag", None) or "--" + f.name.replace("_", "-")
            default = f.default_factory() if callable(f.default_factory) else f.default
            if isinstance(default, bool):
                action = "store_false" if default else "store_true"
                parser.add_argument(flag, dest=f.name, action=action, help=meta["help"])
                continue
            if "type" not in meta and default is not None:
                meta["type"] = type(default)
            parser.add_argument(flag, dest=f.name, default=default, **meta)


class SegNet(nn.Module):
    """DeepLab-v3+ and a 1x1 classifier; ``forward`` returns ``(B, C, H, W)`` logits at the
    input size (bilinear upsampling of the stride-4 map)."""

    def __init__(self, num_classes: int, arch: str = "resnet18", output_stride: int = 16,
                 width: int = 64, channels: int = 256):
        super().__init__()
        self.net = DeepLabV3Plus(arch, output_stride, width, channels)
        self.cls = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def features(self, x: Tensor) -> Tensor:
        return self.net(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.cls(self.net(x)), x.shape[2:], mode="bilinear",
                             align_corners=False)


def read_checkpoint(path: str | Path) -> dict:
    """Load any checkpoint this package writes, or a plain ResNet state dict, and say which:
    returns ``{"kind": "pretrain" | "finetune" | "backbone", "state": {...}, "arch": {...}
    or None, ...}`` (``state`` keys without ``module.`` prefixes)."""
    sd = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} is not a state-dict checkpoint")
    if sd.get("kind") == "finetune":
        return {"kind": "finetune", "state": sd["model"], "arch": sd["arch"],
                "classes": sd["classes"], "cfg": sd.get("options", {})}
    if "model" in sd and "config" in sd:
        m = sd["config"]["model"]
        state = {k.removeprefix("module."): v for k, v in sd["model"].items()}
        return {"kind": "pretrain", "state": state, "arch": {k: m[k] for k in ARCH_KEYS},
                "classes": sd.get("classes"), "cfg": sd["config"]}
    state = sd.get("state_dict", sd)
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is neither an mdp_train checkpoint nor a ResNet state dict")
    return {"kind": "backbone", "state": state, "arch": None, "classes": None, "cfg": {}}


def backbone_state(ckpt: dict) -> dict[str, Tensor]:
    """The ResNet weights of a checkpoint read by :func:`read_checkpoint`, with torchvision
    names (no ``net.backbone.``/``backbone.``/``module.`` prefix, no ``fc.*``)."""
    if ckpt["kind"] == "backbone":
        out = {}
        for k, v in ckpt["state"].items():
            for p in ("module.", "backbone."):
                k = k.removeprefix(p)
            if not k.startswith("fc."):
                out[k] = v
        return out
    pre = "net.backbone."
    out = {k[len(pre):]: v for k, v in ckpt["state"].items() if k.startswith(pre)}
    if not out:
        raise ValueError("the checkpoint holds no net.backbone.* weights")
    return out


def initialise(model: SegNet, init: str | Path | None, scope: str = "all") -> str:
    """Load ``init`` into ``model``: a pretraining or fine-tuning checkpoint transfers the
    whole DeepLab-v3+ (``scope="all"``) or its backbone only (``scope="backbone"``); a plain
    ResNet state dict transfers the backbone. The classifier always starts fresh. Returns a
    one-line description."""
    if init is None:
        return "random initialisation"
    if scope not in ("all", "backbone"):
        raise ValueError(f"scope must be 'all' or 'backbone', got {scope!r}")
    ck = read_checkpoint(init)
    if ck["kind"] == "backbone" or scope == "backbone":
        model.net.backbone.load_state_dict(backbone_state(ck), strict=True)
        return f"backbone from {ck['kind']} checkpoint {init}"
    net = {k[4:]: v for k, v in ck["state"].items() if k.startswith("net.")}
    model.net.load_state_dict(net, strict=True)
    return f"DeepLab-v3+ from {ck['kind']} checkpoint {init}"


# --------------------------------------------------------------------------------- data
def split_dataset(root: str | Path, subsets: list[str] | None, prefix: str | None):
    """A :class:`~mdp_train.datasets.Folder` dataset restricted to the images whose file
    name starts with ``prefix`` (e.g. CamVid's ``train_``/``test_``)."""
    ds = Folder(root, subsets)
    if prefix:
        ds.pairs = [p for p in ds.pairs if p[0].name.startswith(prefix)]
        if not ds.pairs:
            raise ValueError(f"no image of {root} {subsets or ''} starts with {prefix!r}")
    return ds


def preload(ds) -> list[tuple[Tensor, Tensor]]:
    """Every ``(image uint8 (3, H, W), label int64 (H, W))`` pair of a labelled reader."""
    out = [ds.load(i) for i in range(len(ds))]
    if any(lbl is None for _, lbl in out):
        raise ValueError(f"{ds!r} has unlabelled images: fine-tuning needs labels")
    return out


def train_sample(img: Tensor, lbl: Tensor, crop: tuple[int, int], scale: tuple[float, float],
                 g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random rescale (factor uniform in ``scale``), random ``crop = (h, w)`` (padded with
    ignore where the image is smaller) and horizontal flip; ImageNet-normalised image."""
    s = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=g))
    h, w = max(1, round(img.shape[1] * s)), max(1, round(img.shape[2] * s))
    x = F.interpolate(img[None].float() / 255, (h, w), mode="bilinear", align_corners=False,
                      antialias=True)[0]
    y = F.interpolate(lbl[None, None].double(), (h, w), mode="nearest-exact")[0, 0].long()
    ch, cw = crop
    ph, pw = max(0, ch - h), max(0, cw - w)
    x = normalize(F.pad(x, (0, pw, 0, ph)))
    y = F.pad(y, (0, pw, 0, ph), value=IGNORE)
    top = int(torch.randint(y.shape[0] - ch + 1, (), generator=g))
    left = int(torch.randint(y.shape[1] - cw + 1, (), generator=g))
    x, y = x[:, top:top + ch, left:left + cw], y[top:top + ch, left:left + cw]
    if float(torch.rand((), generator=g)) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x, y


@torch.no_grad()
def predict(model: SegNet, img: Tensor, scale: float) -> Tensor:
    """Class ids ``(H, W)`` of one uint8 image: run at ``scale`` times its size, logits
    upsampled back to the full size."""
    h, w = img.shape[1:]
    x = normalize(img.float() / 255)[None]
    if scale != 1:
        x = F.interpolate(x, (round(h * scale), round(w * scale)), mode="bilinear",
                          align_corners=False, antialias=True)
    logits = model.cls(model.net(x))
    return F.interpolate(logits, (h, w), mode="bilinear", align_corners=False)[0].argmax(0)


def evaluate(model: SegNet, pairs, num_classes: int, scale: float = 1.0,
             progress: bool = True) -> IoUMeter:
    """mIoU meter over ``pairs`` (``(image, label)`` with 255 = ignore)."""
    model.eval()
    meter = IoUMeter(num_classes, IGNORE)
    for img, lbl in tqdm(pairs, desc="mdp-eval", disable=not progress, dynamic_ncols=True):
        meter.update(predict(model, img, scale), lbl)
    return meter


# ------------------------------------------------------------------------------ training
def build_model(cfg: FinetuneConfig, num_classes: int) -> tuple[SegNet, dict, str]:
    """The network, its architecture (taken from ``cfg.init`` when that is an mdp_train
    checkpoint) and how it was initialised; a frozen backbone gets no gradient."""
    arch = {k: getattr(cfg, k) for k in ARCH_KEYS}
    if cfg.init:
        a = read_checkpoint(cfg.init)["arch"]
        arch = a if a is not None else arch
    model = SegNet(num_classes, **arch)
    how = initialise(model, cfg.init, cfg.scope)
    if cfg.freeze_backbone:
        for p in model.net.backbone.parameters():
            p.requires_grad_(False)
    return model, arch, how


def train(model: SegNet, data: list, cfg: FinetuneConfig) -> list[float]:
    """SGD with MMSegmentation's poly schedule, lr (1 - t / T)^0.9 (floor 1e-4 lr), on random
    crops of ``data``; the per-step losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: max(1e-4, (1 - t / cfg.steps) ** 0.9))
    g = torch.Generator().manual_seed(cfg.seed)
    crop, scale = tuple(cfg.crop), tuple(cfg.scale)
    bar = tqdm(range(cfg.steps), desc="mdp-finetune", disable=not cfg.progress,
               dynamic_ncols=True)
    losses = []
    order = torch.randperm(len(data), generator=g).tolist()
    for _ in bar:
        model.train()
        if cfg.freeze_backbone:  # a fixed backbone keeps its BN statistics too
            model.net.backbone.eval()
        idx = []
        while len(idx) < cfg.batch_size:
            if not order:
                order = torch.randperm(len(data), generator=g).tolist()
            idx.append(order.pop())
        xs, ys = zip(*(train_sample(*data[i], crop, scale, g) for i in idx))
        loss = F.cross_entropy(model(torch.stack(xs)), torch.stack(ys), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.3g}")
    return losses


def finetune(cfg: FinetuneConfig | dict) -> dict:
    """Fine-tune and (when ``eval_prefix`` or ``eval_subsets`` is set) evaluate.

    ``cfg``: a :class:`FinetuneConfig`, or a dict of its fields (the rest take their
    defaults). Writes ``<out>/model.pt`` and ``<out>/result.json`` (atomically, the result
    last); returns the result dict.
    """
    cfg = cfg if isinstance(cfg, FinetuneConfig) else FinetuneConfig.from_dict(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ds = split_dataset(cfg.data, cfg.subsets, cfg.prefix)
    names = list(ds.classes)
    model, arch, how = build_model(cfg, len(names))
    start, cpu = time.time(), time.process_time()
    losses = train(model, preload(ds), cfg)
    train_s, train_cpu = time.time() - start, time.process_time() - cpu
    files.save({"kind": "finetune", "model": model.state_dict(), "arch": arch, "classes": names,
                "options": {k: v for k, v in dataclasses.asdict(cfg).items()
                            if k != "progress"}}, out / "model.pt")
    res = {"init": how, "frozen_backbone": cfg.freeze_backbone, "steps": cfg.steps,
           "train_seconds": train_s, "train_cpu_seconds": train_cpu,
           "seconds_per_step": train_s / max(1, cfg.steps),
           "first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:])),
           "arch": arch, "classes": names}
    if cfg.eval_prefix or cfg.eval_subsets:
        test = split_dataset(cfg.data, cfg.eval_subsets or cfg.subsets, cfg.eval_prefix)
        meter = evaluate(model, preload(test), len(names), cfg.eval_scale, cfg.progress)
        res.update(miou=meter.miou(), acc=meter.accuracy(),
                   iou=[None if math.isnan(v) else v for v in meter.iou().tolist()],
                   images=len(test))
        files.write_text(out / "eval.md", meter.table(names) + "\n")
    files.write_text(out / "result.json", json.dumps(res, indent=1) + "\n")
    return res


def load_segnet(path: str | Path) -> tuple[SegNet, list[str], dict]:
    """A fine-tuned model from its checkpoint: ``(model in eval mode, class names, options)``."""
    ck = read_checkpoint(path)
    if ck["kind"] != "finetune":
        raise ValueError(f"{path} is a {ck['kind']} checkpoint, not a fine-tuned model")
    model = SegNet(len(ck["classes"]), **ck["arch"])
    model.load_state_dict(ck["state"])
    return model.eval(), ck["classes"], ck["cfg"]


def export_backbone(src: str | Path, dst: str | Path) -> dict[str, Tensor]:
    """Write the ResNet of any checkpoint as a plain torchvision-named state dict (loadable
    with ``strict=True`` into a torchvision ResNet without ``fc``). Returns it."""
    state = backbone_state(read_checkpoint(src))
    sd = {k: v.detach().clone().contiguous() for k, v in state.items()}
    files.save(sd, dst)
    return sd

