"""``PrototypeBank``: the memory bank of class prototypes (paper Eq. 2)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checks, dispatch, ops, reference, validation as V
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

    ``update`` is ``commit(slot(...))``: ``slot`` computes and checks a new slot without
    touching the state, so a call that raises leaves the bank bit-identical. Under
    ``torch.distributed`` each new slot is all-reduced (summed) before it is stored, so every
    rank holds the same bank, built from the global batch.

    Args:
        num_classes: ``C`` (all datasets' label spaces concatenated).
        dim: embedding size ``D``.
        num_slots: number of batches remembered (>= 1).
        ignore_index: label of pixels that are pooled nowhere (default -100; must not be a
            class, i.e. not in ``[0, C)``).
        dtype: floating storage dtype (float32; float64 for exact tests).
        device: where the state lives (default: the default device); ``.to()`` moves it.
        backend: as the functional ops. The bank phases (``bank_slot``,
            ``bank_prototypes``) of a backend that has no kernel for them (``triton``) run
            the reference implementation on the same device: small reductions, no matmul.

    Shape:
        - State: ``slot_sums`` ``(num_slots, C, D)``, ``slot_counts`` ``(num_slots, C)``.
        - ``key_feats``: ``(B, D, *spatial)`` or ``(N, D)``; ``labels``: ``(B, *spatial)`` or
          ``(N,)``, int, ``ignore_index`` or a class in ``[0, C)``.
        - :meth:`prototypes`: ``P`` ``(C, D)`` and ``valid`` ``(C,)`` bool.

    Examples::

        >>> bank = PrototypeBank(num_classes=19, dim=16, num_slots=4)
        >>> k = F.normalize(torch.randn(2, 16, 8, 8), dim=1)
        >>> y = torch.randint(0, 19, (2, 8, 8)); y[:, 0] = -100
        >>> bank.update(k, y)
        >>> P, valid = bank.prototypes()
        >>> P.shape, bool(valid.any())
        (torch.Size([19, 16]), True)
        >>> s, n = bank.slot(k, y)  # checked, state untouched
        >>> bank.commit(s, n)
        >>> int(bank.num_updates)
        2
    """

    def __init__(self, num_classes: int, dim: int, num_slots: int, *, ignore_index: int = -100,
                 dtype: torch.dtype = torch.float32, device=None, backend: str = "auto"):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("dim", dim), ("num_slots", num_slots)):
            V.check_positive_int(value, name)
        V.check_ignore_index(ignore_index, num_classes)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        dispatch.check_runnable(backend)
        self.num_classes, self.dim, self.num_slots = num_classes, dim, num_slots
        self.ignore_index, self.backend = ignore_index, backend
        self.register_buffer("slot_sums", torch.zeros(num_slots, num_classes, dim, dtype=dtype,
                                                      device=device))
        self.register_buffer("slot_counts", torch.zeros(num_slots, num_classes, dtype=dtype,
                                                        device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64, device=device))

    @torch.no_grad()
    def slot(self, key_feats: Tensor, labels: Tensor, *, check_finite: bool = True,
             name: str = "key_feats") -> tuple[Tensor, Tensor]:
        """The slot ``(S (C, D), n (C,))`` that ``key_feats`` would store, without touching
        the state (all-reduced under ``torch.distributed``).

        Args:
            key_feats: ``(B, D, *spatial)`` or ``(N, D)`` key-encoder embeddings (detached).
            labels: ``(B, *spatial)`` or ``(N,)`` class labels; ``ignore_index`` is pooled
                nowhere.
            check_finite: refuse NaN/inf key features with ``ValueError``.
            name: what error messages call ``key_feats`` (the caller's argument).
        """
        if not isinstance(key_feats, Tensor) or key_feats.dim() < 2 or (
                key_feats.shape[1] != self.dim):
            raise ValueError(f"{name} must be (B, {self.dim}, *spatial) or (N, {self.dim}), "
                             f"got {getattr(key_feats, 'shape', key_feats)!r}")
        if key_feats.device != self.slot_sums.device:
            raise ValueError(f"{name} is on {key_feats.device} but the bank is on "
                             f"{self.slot_sums.device}; move the bank with .to()")
        sums, counts = class_embedding_sums(key_feats.detach(), labels, self.num_classes,
                                            ignore_index=self.ignore_index, backend=self.backend)
        be = dispatch.resolve_phase("bank_slot", self.backend, sums.device)
        s, n = (reference.bank_slot(sums, counts) if be == "reference"
                else ops.bank_slot(sums, counts, be))
        if check_finite:  # the token makes the stored slot depend on the check
            s = s + checks.check_finite(key_feats.detach(), name)
        s, n = s.to(self.slot_sums.dtype), n.to(self.slot_sums.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(s)
            dist.all_reduce(n)
        return s, n

    @torch.no_grad()
    def commit(self, s: Tensor, n: Tensor, *, after: tuple[Tensor, ...] = ()) -> None:
        """Store a slot in place of the oldest.

        Args:
            s, n: a slot from :meth:`slot`, ``(C, D)`` and ``(C,)``.
            after: tensors the write must follow (a loss computed from the prospective
                prototypes), which orders it also inside a compiled graph.
        """
        if after:
            s, n = checks.after(s, list(after)), checks.after(n, list(after))
        index = self.ptr.view(1)
        self.slot_sums.index_copy_(0, index, s.unsqueeze(0))
        self.slot_counts.index_copy_(0, index, n.unsqueeze(0))
        self.ptr.copy_((self.ptr + 1) % self.num_slots)
        self.num_updates.add_(1)

    def update(self, key_feats: Tensor, labels: Tensor, *, check_finite: bool = True) -> None:
        """Pool ``key_feats`` by ``labels`` into one slot, evicting the oldest: arguments as
        :meth:`slot`. Raises (leaving the bank unchanged) on bad input, including NaN/inf
        key features unless ``check_finite=False``."""
        self.commit(*self.slot(key_feats, labels, check_finite=check_finite))

    @torch.no_grad()
    def prototypes(self, normalize: bool = True, *,
                   pending: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``(P (C, D), valid (C,) bool)``: the class means over the stored slots; a class
        no stored image contains is invalid and its row is 0.

        Args:
            normalize: L2-normalise each valid row.
            pending: a slot from :meth:`slot`, counted as if committed (in place of the
                oldest), without changing the state.
        """
        sums, counts = self.slot_sums, self.slot_counts
        if pending is not None:
            index = self.ptr.view(1)
            sums = sums.index_copy(0, index, pending[0].unsqueeze(0))
            counts = counts.index_copy(0, index, pending[1].unsqueeze(0))
        name = dispatch.resolve_phase("bank_prototypes", self.backend, sums.device)
        if name == "reference":
            return reference.bank_prototypes(sums, counts, normalize)
        return ops.bank_prototypes(sums, counts, normalize=normalize, backend=name)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, num_slots={self.num_slots}"
