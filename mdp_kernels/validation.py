"""Input checks shared by every op. Each raises a Python exception that names the problem.

Shape, dtype and device checks are static and also run while ``torch.compile`` traces.
Value checks (labels, finiteness, tensor ``lam`` and ``tau``) read the data; they are the
``mdp`` custom ops of ``checks.py``, so they run in eager mode, compiled graphs and exported
programs alike.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_float(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def check_labels_tensor(labels: Tensor, name: str) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")


def check_same_device(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def check_same_dtype(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}; cast one of them")


def check_feats_labels(feats: Tensor, labels: Tensor, fname: str = "feats",
                       lname: str = "labels") -> None:
    """``feats`` (B, D, *spatial) with ``labels`` (B, *spatial), or (N, D) with (N,)."""
    check_float(feats, fname)
    check_labels_tensor(labels, lname)
    check_same_device(fname, feats, lname, labels)
    if feats.dim() < 2:
        raise ValueError(f"{fname} must be (N, D) or (B, D, *spatial), got shape {tuple(feats.shape)}")
    expect = feats.shape[:1] + feats.shape[2:]
    if labels.shape != expect:
        raise ValueError(f"{lname} must have shape {tuple(expect)} to match {fname} of shape "
                         f"{tuple(feats.shape)}, got {tuple(labels.shape)}")


def check_prototypes(protos: Tensor, feats: Tensor, fname: str = "feats") -> None:
    check_float(protos, "prototypes")
    check_same_device("prototypes", protos, fname, feats)
    check_same_dtype("prototypes", protos, fname, feats)
    if protos.dim() != 2 or protos.shape[1] != feats.shape[1]:
        raise ValueError(f"prototypes must be (C, D) with D = {feats.shape[1]} (the channel "
                         f"dim of {fname}), got shape {tuple(protos.shape)}")
    if protos.shape[0] == 0:
        raise ValueError("prototypes must hold at least one class (C >= 1)")


def check_class_mask(class_mask: Tensor | None, num_classes: int, device: torch.device,
                     batch: int) -> None:
    """None, or a bool ``(C,)`` mask (every image) or ``(B, C)`` one (per image)."""
    if class_mask is None:
        return
    if not isinstance(class_mask, Tensor) or class_mask.dtype != torch.bool:
        raise TypeError(f"class_mask must be a bool tensor of shape ({num_classes},) or "
                        f"({batch}, {num_classes})")
    if class_mask.shape not in ((num_classes,), (batch, num_classes)):
        raise ValueError(f"class_mask must have shape ({num_classes},) or ({batch}, "
                         f"{num_classes}) (one row per image), got {tuple(class_mask.shape)}")
    if class_mask.device != device:
        raise ValueError(f"class_mask is on {class_mask.device} but the features are on {device}")


def _real(value) -> bool:
    """A Python or numpy real number (bool excluded: True is not a temperature). Python
    numbers are tested first: under dynamo, ``type()`` of a traced float would specialise
    the graph on its value."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return type(value).__module__ == "numpy" and isinstance(value, numbers.Real)


def temperature(value, name: str):
    """A positive finite Python/numpy number (returned as such; numpy as ``float``) or a
    0-d floating tensor (returned as is: its value is checked by ``checks.check_positive``
    inside the graph, and it may require grad: a learnable temperature)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a positive number or a 0-d floating tensor, got a "
                            f"{value.dtype} tensor of shape {tuple(value.shape)}")
        return value
    if not _real(value):
        raise TypeError(f"{name} must be a positive number or a 0-d floating tensor, got "
                        f"{type(value).__name__}")
    if not isinstance(value, (int, float)):
        value = float(value)  # a numpy scalar
    if not (value > 0 and value < math.inf):  # also False for NaN
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def check_threshold(value) -> None:
    if not _real(value):
        raise TypeError(f"threshold must be a real number, got {type(value).__name__}")
    if not (-math.inf < value < math.inf):
        raise ValueError(f"threshold must be finite, got {value!r}")


def check_ignore_index(ignore_index, num_classes: int | None = None) -> None:
    """An int; when the class count is known, not one of the classes (it would silently
    drop that class from every loss, the bank and the pseudo-labels)."""
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if num_classes is not None and 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index={ignore_index} is one of the {num_classes} classes "
                         f"[0, {num_classes}): that class would be silently dropped; use an "
                         f"ignore_index outside [0, {num_classes}), e.g. ignore_index=-1")


def check_positive_int(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_class_weight(weight, num_classes: int, device: torch.device) -> None:
    """None or a floating ``(C,)`` tensor on the features' device (values: ``checks``)."""
    if weight is None:
        return
    if not isinstance(weight, Tensor) or not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating tensor of shape ({num_classes},), got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.shape != (num_classes,):
        raise ValueError(f"weight must have shape ({num_classes},) (one per class), got "
                         f"{tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but the features are on {device}")


def check_label_smoothing(value) -> None:
    if not _real(value):
        raise TypeError(f"label_smoothing must be a real number, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {value!r}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_memory(memory: str) -> None:
    if memory not in ("auto", "low"):
        raise ValueError(f"memory must be 'auto' or 'low', got {memory!r}")


def check_lam(lam, batch: int, device: torch.device) -> None:
    """A number in [0, 1] or a floating ``(B,)`` / 0-d tensor (its values are checked by
    ``checks.check_range`` inside the graph)."""
    if isinstance(lam, Tensor):
        if not lam.dtype.is_floating_point:
            raise TypeError(f"lam must be a float or a floating (B,) tensor, got {lam.dtype}")
        if lam.shape not in ((batch,), ()):
            raise ValueError(f"lam must be a float or a tensor of shape ({batch},) (one per "
                             f"image), got shape {tuple(lam.shape)}")
        if lam.device != device:
            raise ValueError(f"lam is on {lam.device} but the features are on {device}")
    elif _real(lam):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
    else:
        raise TypeError(f"lam must be a float or a (B,) tensor, got {type(lam).__name__}")
