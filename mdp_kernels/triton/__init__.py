"""Triton kernels (the ``triton`` backend): one module per kernel phase, registered with
``dispatch`` under the names of the kernel contract. Imported only when ``triton`` imports.

On CUDA tensors they compile for the GPU; with ``TRITON_INTERPRET=1`` they run on CPU tensors
through the Triton interpreter (the test suite's mode when there is no GPU).
``mdp_kernels.config.deterministic = False`` switches the prototype gradients of ce_bwd /
con_bwd to float atomics. The deterministic path is the default: it recomputes the logit
tiles a second time (cheap tensor-core work for bf16/fp16), while the atomic path issues
C x D float adds per pixel block; which is faster on a given GPU and shape is not measured
yet (no GPU was available when these kernels were written). Configs, pruning and the
feature-dim limit: ``_launch``; autotuning, the fp32 precision (tf32x3 by default) and
pinned meta-parameters are ``mdp_kernels.config`` settings.
"""
from .. import dispatch
from .ce_bwd import ce_bwd
from .ce_fwd import ce_fwd
from .class_sums import class_sums, class_sums_bwd
from .con_bwd import con_bwd
from .con_fwd import con_fwd
from .pix_bwd import pix_bwd
from .normalize import normalize_bwd, normalize_fwd
from .pix_fwd import pix_fwd
from .pseudo_label import pseudo_label

KERNELS = {"class_sums": class_sums, "class_sums_bwd": class_sums_bwd, "ce_fwd": ce_fwd,
           "ce_bwd": ce_bwd, "con_fwd": con_fwd, "con_bwd": con_bwd, "pix_fwd": pix_fwd,
           "pix_bwd": pix_bwd, "pseudo_label": pseudo_label, "normalize_fwd": normalize_fwd,
           "normalize_bwd": normalize_bwd}

for _name, _fn in KERNELS.items():
    dispatch.register("triton", _name, _fn)
