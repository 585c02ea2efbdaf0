"""Run-time configuration of the kernels: one object, ``mdp_kernels.config``.

Read and set its attributes at any time (``mk.config.save = "none"``), or for a block::

    with mk.config.override(save="basis"):
        loss = mk.prototype_contrast_loss(...)

``save``: what a loss's forward keeps for its backward, where the backend has the kernels:
    ``"auto"`` (default): the backend's own policy (``dispatch.register_save_policy``; the
    cpu backend's is in ``extension.py``); ``"basis"``: the feature-gradient basis (CE and
    consistency; the feature backward needs no logit recompute); ``"probs"``: the CE
    softmax (neither gradient recomputes logits; ``N x C`` memory); ``"none"``: nothing
    (the backward recomputes the logit tiles). A choice the backend has no kernels for, or
    that no gradient would use, falls back to ``"none"``.
"""
from __future__ import annotations

from contextlib import contextmanager

SAVE_CHOICES = ("auto", "basis", "probs", "none")


class Config:
    __slots__ = ("save",)

    def __init__(self):
        self.save = "auto"

    def __setattr__(self, name, value):
        if name == "save" and value not in SAVE_CHOICES:
            raise ValueError(f"config.save must be one of {SAVE_CHOICES}, got {value!r}")
        object.__setattr__(self, name, value)

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
        return f"mdp_kernels.config(save={self.save!r})"


config = Config()
