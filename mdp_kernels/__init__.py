"""mdp-kernels: fused pixel-to-prototype contrastive losses for multi-dataset pretraining.

Public API: the functional ops, ``PrototypeBank`` and the ``PrototypeContrastLoss`` module.
Every op takes ``backend="auto" | "reference" | "cpu" | "cuda" | "triton"``. On CUDA
tensors ``auto`` picks Triton; the ``cuda`` backend is experimental (not measured on a GPU,
see the README, Backends) and runs only when asked for or where Triton is missing.
"""
from . import ops  # registers the mdp:: custom ops
from . import extension  # registers the C++/CUDA kernels
from . import dispatch as _dispatch

try:
    import triton as _triton_lib  # noqa: F401
except ImportError as _exc:
    _dispatch.mark_unavailable("triton", f"triton is not installed ({_exc})")
else:
    from . import triton  # noqa: F401  registers the Triton kernels
from .bank import PrototypeBank
from .config import config
from .dispatch import available_backends
from .functional import (class_embedding_sums, masked_average_pool, pixel_contrast_loss,
                         prototype_consistency_loss, prototype_contrast_loss, pseudo_label)
from .modules import PrototypeContrastLoss

__version__ = "0.1.0"
__all__ = ["PrototypeBank", "PrototypeContrastLoss", "available_backends", "config",
           "class_embedding_sums", "masked_average_pool", "pixel_contrast_loss",
           "prototype_consistency_loss", "prototype_contrast_loss", "pseudo_label"]
