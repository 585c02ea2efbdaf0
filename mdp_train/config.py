"""Pretraining configuration: nested defaults, YAML files and ``key=value`` overrides."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

DEFAULTS: dict = {
    "data": {
        # [{type: voc|ade20k|cityscapes|coco_stuff|folder, root, ..., remap, frames}]
        # frames (optional): first_half | second_half | [start, stop] of the sorted images
        "datasets": [],
        # [{type: images, root, frames}]: pseudo-labelled (semi-supervised); a labelled
        # reader with hidden: <labelled dataset name> (same classes) is read without its
        # labels, which only score the pseudo-labels (coverage, accuracy)
        "unlabelled": [],
        "crop_size": 224,
        "crop_scale": [0.2, 1.0],
        "workers": 4,
    },
    "model": {
        "arch": "resnet50",
        "output_stride": 16,
        "width": 64,
        "channels": 256,       # ASPP / decoder channels
        "dim": 256,            # embedding size
        "momentum": 0.999,     # key encoder EMA
        "pretrained": None,    # torchvision-format ResNet checkpoint
        "sync_bn": False,      # SyncBatchNorm under torchrun (CUDA); the key encoder too
    },
    "loss": {
        "kind": "mdp",         # mdp | pixel (Eq. 1 baseline) | ce (concatenated-label CE)
        "tau": 0.07,
        "alpha": 0.2,
        "tau_student": 0.07,
        "tau_teacher": 0.04,
        "bank_images": "auto",  # auto = half the labelled images
        "con_space": "proj",   # consistency on proj features vs the bank | bank: own con bank
        # each image's softmax (class and consistency terms) over its own dataset's classes;
        # a mixed image over the union of both images' datasets; unlabelled images: all
        "dataset_aware": False,
        "backend": "auto",
    },
    "semi": {                  # pseudo-labels of data.unlabelled (Eq. 10)
        # softmax (top probability at tau) | margin (top-2 cosine gap) | cosine (the paper's
        # raw similarity: on CamVid it keeps ~all pixels, issue16-checks.md)
        "confidence": "softmax",
        "threshold": 0.8,      # on the confidence score
        "tau": 0.07,           # softmax temperature (confidence: softmax)
        "warmup_steps": "auto",  # no pseudo-labels before this step; auto = bank slots
    },
    # prob: share of view-1 samples mixed; cutmix : mixup is the ratio of the two methods;
    # replace_view: the mixed view replaces view 1 (else it is an extra view, Fig. 2)
    "mix": {"prob": 1.0, "cutmix": 0.5, "mixup": 0.5, "replace_view": False},
    "optim": {"lr": 0.8, "ref_batch": 128, "momentum": 0.9, "weight_decay": 4e-5},
    "train": {
        "batch_size": 128,     # global batch (split over ranks)
        "epochs": 100,
        "steps": None,         # overrides epochs when set
        "seed": 0,
        "amp": True,           # autocast (bfloat16) on GPU
        "out": "runs/mdp",
        "save_every": 1000,
        "log_every": 10,
        "resume": "auto",      # auto (out/checkpoint.pt if present) | a path | null
        "progress": True,
        "device": "auto",
        "probe_every": 0,      # held-out nearest-prototype probe every N steps (0: off)
        "probe_fraction": 0.1,  # of each labelled set, held out (never trained on) if probing
        "tensorboard": False,  # also write <out>/tb (needs the tensorboard package)
    },
}


# Keys whose value may be of another type than their default's.
TYPES = {"loss.bank_images": (str, int), "semi.warmup_steps": (str, int),
         "train.steps": (type(None), int), "train.resume": (str, os.PathLike, type(None)),
         "model.pretrained": (type(None), str, os.PathLike)}


def _check_type(key: str, default, value) -> None:
    """``value`` has the type of ``default`` (ints for floats, paths for strings), or one
    that ``TYPES`` allows for ``key``."""
    if key in TYPES:
        allowed = TYPES[key]
    elif default is None:
        return
    elif isinstance(default, bool):
        allowed = (bool,)
    elif isinstance(default, float):
        allowed = (int, float)
    elif isinstance(default, str):
        allowed = (str, os.PathLike)
    else:
        allowed = (type(default),)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ValueError(f"config key {key!r} takes {names}, got {value!r}")


def merge(base: dict, new: dict, where: str = "") -> dict:
    """Recursive update of ``base`` by ``new``; unknown keys and values of the wrong type
    are errors naming the key."""
    out = copy.deepcopy(base)
    for k, v in new.items():
        if k not in out:
            raise KeyError(f"unknown config key {where + k!r}")
        if isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = merge(out[k], v, f"{where}{k}.")
        else:
            _check_type(where + k, out[k], v)
            out[k] = v
    return out


def override(cfg: dict, item: str) -> dict:
    """Apply one ``a.b.c=value`` override (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"overrides are key=value, got {item!r}")
    new: dict = {}
    cur = new
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = yaml.safe_load(raw)
    return merge(cfg, new)


def load(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        with open(path) as f:
            cfg = merge(cfg, yaml.safe_load(f) or {})
    for item in overrides:
        cfg = override(cfg, item)
    return cfg
