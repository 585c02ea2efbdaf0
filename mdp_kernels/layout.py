"""Layouts, accumulation dtype and reductions of the fused path (a leaf module: it imports
nothing of ours). The reference backend has its own, so that it stays an independent ground
truth."""
from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What kernels accumulate and return in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_bdp(x: Tensor) -> Tensor:
    """(N, D) -> (1, D, N); (B, D, *spatial) -> (B, D, P). A view whenever possible."""
    return x.t().unsqueeze(0) if x.dim() == 2 else x.flatten(2)


def as_bp(labels: Tensor) -> Tensor:
    """(N,) -> (1, N); (B, *spatial) -> (B, P)."""
    return labels.unsqueeze(0) if labels.dim() == 1 else labels.flatten(1)


def spatial(x: Tensor) -> torch.Size:
    """The label shape that goes with features ``x``: (N,) or (B, *spatial)."""
    return x.shape[:1] + x.shape[2:]


def safe_mean(total: Tensor, norm: Tensor) -> Tensor:
    """``total / norm``, and 0 with a zero gradient where ``norm`` is 0 (a mean over no
    pixels, or over pixels whose targets all weigh 0)."""
    some = norm > 0
    return torch.where(some, total, 0.0) / torch.where(some, norm, 1)


def reduce(per_pixel: Tensor, norm: Tensor, reduction: str, shape) -> Tensor:
    """``"none"``: ``per_pixel`` in ``shape``; ``"sum"``; ``"mean"``: the sum over ``norm``
    (the pixel count, or the summed target weights)."""
    if reduction == "none":
        return per_pixel.reshape(shape)
    total = per_pixel.sum()
    return total if reduction == "sum" else safe_mean(total, norm)


def mix_reduce(la: Tensor, na: Tensor, lb: Tensor, nb: Tensor, lam, reduction: str,
               shape) -> Tensor:
    """Eq. 6: lam_i * l(i, a_i) + (1 - lam_i) * l(i, b_i); "mean" divides each term by its
    own normaliser, as two ``cross_entropy(..., ignore_index)`` calls would."""
    lam_px = torch.as_tensor(lam, dtype=la.dtype, device=la.device).reshape(-1, 1)
    wa, wb = lam_px * la, (1 - lam_px) * lb
    if reduction == "none":
        return (wa + wb).reshape(shape)
    if reduction == "sum":
        return (wa + wb).sum()
    return safe_mean(wa.sum(), na) + safe_mean(wb.sum(), nb)
