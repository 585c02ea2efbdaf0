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
    gradients add partial sums with atomics (``torch.use_deterministic_algorithms(True)``
    keeps the CUDA kernels deterministic regardless).
``cpu_tile_rows`` (``MDP_CPU_TILE_ROWS``, default None): pixels per chunk of the cpu
    kernels; None sizes chunks to about 512 KB of float32 logits.
``cpu_pix_cols`` (``MDP_CPU_PIX_COLS``, default None): key pixels per block of the cpu
    pixel-to-pixel kernels; None is 512.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable

SAVE_CHOICES = ("auto", "basis", "probs", "none")


def _check(name: str, value):
    if name == "save":
        if value not in SAVE_CHOICES:
            raise ValueError(f"config.save must be one of {SAVE_CHOICES}, got {value!r}")
    elif name == "deterministic":
        if not isinstance(value, bool):
            raise TypeError(f"config.deterministic must be a bool, got {value!r}")
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
    __slots__ = ("save", "deterministic", "cpu_tile_rows", "cpu_pix_cols", "_listeners")

    def __init__(self):
        object.__setattr__(self, "_listeners", [])
        self.save = os.environ.get("MDP_SAVE", "auto")
        self.deterministic = os.environ.get("MDP_DETERMINISTIC", "1") != "0"
        self.cpu_tile_rows = _env_int("MDP_CPU_TILE_ROWS")
        self.cpu_pix_cols = _env_int("MDP_CPU_PIX_COLS")

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
