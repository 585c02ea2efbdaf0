"""``PrototypeBank``: the memory bank of class prototypes (paper Eq. 2)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import dispatch, ops, reference
from .functional import class_embedding_sums


class PrototypeBank(nn.Module):
    r"""Ring buffer of ``num_slots`` per-batch class statistics.

    A slot holds, for one batch, :math:`S_j = \sum_i m_{ij} p_{ij}` (``p_ij`` the mean
    embedding of class ``j`` in image ``i``, ``m_ij = 1`` if image ``i`` contains ``j``) and
    :math:`n_j = \sum_i m_{ij}`. The prototype of class ``j`` is
    :math:`P_j = \sum_{slots} S_j / \sum_{slots} n_j`; a class no stored image contains is
    invalid. ``num_slots`` = bank size in images / batch size (the paper: about half the
    dataset). State lives in buffers, so ``state_dict`` round-trips exactly, ``.to()`` moves
    the bank, and it holds no autograd history.

    Under ``torch.distributed`` each new slot is all-reduced (summed) before it is stored,
    so every rank holds the same bank, built from the global batch.

    Args:
        num_classes: ``C`` (all datasets' label spaces concatenated).
        dim: embedding size ``D``.
        num_slots: number of batches remembered (>= 1).
        dtype: storage dtype (float32; float64 for exact tests).
    """

    def __init__(self, num_classes: int, dim: int, num_slots: int, *, ignore_index: int = 255,
                 dtype: torch.dtype = torch.float32, device=None, backend: str = "auto"):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("dim", dim), ("num_slots", num_slots)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        dispatch.check_backend(backend)
        self.num_classes, self.dim, self.num_slots = num_classes, dim, num_slots
        self.ignore_index, self.backend = ignore_index, backend
        self.register_buffer("slot_sums", torch.zeros(num_slots, num_classes, dim, dtype=dtype,
                                                      device=device))
        self.register_buffer("slot_counts", torch.zeros(num_slots, num_classes, dtype=dtype,
                                                        device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64, device=device))

    @torch.no_grad()
    def update(self, key_feats: Tensor, labels: Tensor) -> None:
        """Pool ``key_feats`` ``(B, D, *spatial)`` by ``labels`` into one slot, evicting the
        oldest (all-reduced first under ``torch.distributed``)."""
        if key_feats.dim() < 2 or key_feats.shape[1] != self.dim:
            raise ValueError(f"key_feats must be (B, {self.dim}, *spatial) or (N, {self.dim}), "
                             f"got {tuple(key_feats.shape)}")
        if key_feats.device != self.slot_sums.device:
            raise ValueError(f"key_feats is on {key_feats.device} but the bank is on "
                             f"{self.slot_sums.device}; move the bank with .to()")
        sums, counts = class_embedding_sums(key_feats.detach(), labels, self.num_classes,
                                            ignore_index=self.ignore_index, backend=self.backend)
        name = dispatch.resolve(("bank_slot",), self.backend, sums.device)
        slot = (reference.bank_slot(sums, counts) if name == "reference"
                else ops.bank_slot(sums, counts, name))
        s, n = (x.to(self.slot_sums.dtype) for x in slot)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(s)
            dist.all_reduce(n)
        index = self.ptr.view(1)
        self.slot_sums.index_copy_(0, index, s.unsqueeze(0))
        self.slot_counts.index_copy_(0, index, n.unsqueeze(0))
        self.ptr.copy_((self.ptr + 1) % self.num_slots)
        self.num_updates.add_(1)

    @torch.no_grad()
    def prototypes(self, normalize: bool = True) -> tuple[Tensor, Tensor]:
        """``(P (C, D), valid (C,) bool)``; ``normalize`` L2-normalises each valid row.
        Invalid rows are 0."""
        name = dispatch.resolve(("bank_prototypes",), self.backend, self.slot_sums.device)
        if name == "reference":
            return reference.bank_prototypes(self.slot_sums, self.slot_counts, normalize)
        return ops.bank_prototypes(self.slot_sums, self.slot_counts, normalize, name)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, num_slots={self.num_slots}"
