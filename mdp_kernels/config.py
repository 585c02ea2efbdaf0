"""Run-time configuration of the kernels: one object, ``mdp_kernels.config``.

Read and set its attributes at any time (``mk.config.deterministic = False``), or for a
block::

    with mk.config.override(save="basis", cpu_tile_rows=32):
        loss = mk.prototype_contrast_loss(...)

Environment variables give only the defaults, read once at import:

``save`` (``MDP_SAVE``, default ``"auto"``): what a loss's forward keeps for its backward,
    where the backend has the kernels: ``"auto"``: the backend's own policy
    (``dispatch.register_save_policy``; the cpu backend's is in ``extension.py``);
    ``"basis"``: the feature-gradient basis (CE and consistency; the feature backward needs
    no logit recompute); ``"probs"``: the CE softmax (neither gradient recomputes logits;
    ``N x C`` memory); ``"none"``: nothing (the backward recomputes the logit tiles). A
    choice the backend has no kernels for, or that no gradient would use, is ``"none"``.
``deterministic`` (``MDP_DETERMINISTIC``, default on; ``0`` turns it off): no float atomics,
    so results are bitwise reproducible; off, the CUDA class sums and the Triton prototype
    gradients add partial sums with atomics (one logit recompute fewer in the Triton
    backward; ``torch.use_deterministic_algorithms(True)`` keeps the CUDA kernels
    deterministic regardless).
``cpu_tile_rows`` (``MDP_CPU_TILE_ROWS``, default None): pixels per chunk of the cpu
    kernels; None sizes chunks to about 512 KB of float32 logits.
``cpu_pix_cols`` (``MDP_CPU_PIX_COLS``, default None): key pixels per block of the cpu
    pixel-to-pixel kernels; None is 512.
``triton_autotune`` (``MDP_TRITON_AUTOTUNE``, default on; ``0`` turns it off): autotune the
    Triton kernels over the configs that survive pruning; off, each kernel runs its first
    config that fits (bounded compile time, e.g. ``make gpu-check``).
``triton_fp32`` (``MDP_TRITON_FP32``, default ``"auto"``): ``tl.dot`` precision for float32
    inputs: ``"auto"`` (``"tf32x3"``, about fp32 accuracy on tensor cores, or ``"tf32"`` when
    ``torch.backends.cuda.matmul.allow_tf32``), ``"tf32x3"``, ``"tf32"`` or ``"ieee"`` (FMA
    loops: slow).
``triton_meta`` (default None): a dict of meta-parameters every Triton kernel runs with
    instead of the tuned ones (``BLOCK_P``, ``BLOCK_C``, ``BLOCK_Q``, ``BLOCK_K``,
    ``CHUNKS``: pixel chunks per image, ``num_warps``, ``num_stages``); for tests of block
    invariance.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable

SAVE_CHOICES = ("auto", "basis", "probs", "none")
FP32_CHOICES = ("auto", "tf32x3", "tf32", "ieee")
META_KEYS = ("BLOCK_P", "BLOCK_C", "BLOCK_Q", "BLOCK_K", "CHUNKS", "num_warps", "num_stages")


def _check(name: str, value):
    if name == "save":
        if value not in SAVE_CHOICES:
            raise ValueError(f"config.save must be one of {SAVE_CHOICES}, got {value!r}")
    elif name in ("deterministic", "triton_autotune"):
        if not isinstance(value, bool):
            raise TypeError(f"config.{name} must be a bool, got {value!r}")
    elif name == "triton_fp32":
        if value not in FP32_CHOICES:
            raise ValueError(f"config.triton_fp32 must be one of {FP32_CHOICES}, got {value!r}")
    elif name == "triton_meta":
        if value is not None and not (isinstance(value, dict) and set(value) <= set(META_KEYS)
                                      and all(isinstance(v, int) and v > 0
                                              for v in value.values())):
            raise ValueError(f"config.triton_meta must be None or a dict of positive ints "
                             f"with keys among {META_KEYS}, got {value!r}")
    elif value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                or value < 1):
        raise ValueError(f"config.{name} must be a positive int or None, got {value!r}")
    return value


def _env_int(var: str) -> int | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    try:
        return _check(var, int(raw))
    except ValueError:
        raise ValueError(f"{var} must be a positive integer, got {raw!r}") from None


class Config:
    __slots__ = ("save", "deterministic", "cpu_tile_rows", "cpu_pix_cols", "triton_autotune",
                 "triton_fp32", "triton_meta", "_listeners")

    def __init__(self):
        object.__setattr__(self, "_listeners", [])
        self.save = os.environ.get("MDP_SAVE", "auto")
        self.deterministic = os.environ.get("MDP_DETERMINISTIC", "1") != "0"
        self.cpu_tile_rows = _env_int("MDP_CPU_TILE_ROWS")
        self.cpu_pix_cols = _env_int("MDP_CPU_PIX_COLS")
        self.triton_autotune = os.environ.get("MDP_TRITON_AUTOTUNE", "1") != "0"
        self.triton_fp32 = os.environ.get("MDP_TRITON_FP32", "auto")
        self.triton_meta = None

    def __setattr__(self, name, value):
        if name not in self.__slots__ or name == "_listeners":
            raise AttributeError(f"mdp_kernels.config has no setting {name!r}")
        object.__setattr__(self, name, _check(name, value))
        for listener in self._listeners:
            listener(self)

    def on_change(self, listener: Callable[["Config"], None]) -> None:
        """Call ``listener(config)`` now and after every change (a backend that keeps
        settings of its own, e.g. the C++ extension, stays in step)."""
        self._listeners.append(listener)
        listener(self)

    @contextmanager
    def override(self, **settings):
        """Set ``settings`` for the ``with`` block, restoring the previous values after."""
        old = {k: getattr(self, k) for k in settings}
        try:
            for k, v in settings.items():
                setattr(self, k, v)
            yield self
        finally:
            for k, v in old.items():
                setattr(self, k, v)

    def __repr__(self):
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__[:-1])
        return f"mdp_kernels.config({fields})"


config = Config()
