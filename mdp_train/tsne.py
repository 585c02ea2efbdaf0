"""Exact t-SNE (van der Maaten & Hinton, 2008) in torch, for a few thousand points.

O(N^2) memory and time per iteration (no Barnes-Hut): fine for N <= ~5000 on a CPU.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def conditional(x: Tensor, perplexity: float = 30.0, iters: int = 64) -> Tensor:
    """Conditional affinities ``(N, N)`` of points ``x`` ``(N, D)``, float64: row ``i`` is
    ``p_{j|i} = exp(-beta_i d_ij) / sum_k exp(-beta_i d_ik)`` (``d`` = squared distance,
    ``p_{i|i} = 0``) with ``beta_i`` found by bisection so the row entropy is
    ``log(perplexity)``."""
    n = x.shape[0]
    if not 1 <= perplexity < n:
        raise ValueError(f"perplexity must be in [1, N) = [1, {n}), got {perplexity}")
    x = x.double()
    d = torch.cdist(x, x).square()
    d.fill_diagonal_(math.inf)
    target = math.log(perplexity)
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), math.inf, dtype=torch.float64)
    beta = torch.ones(n, dtype=torch.float64) / d[d.isfinite()].mean().clamp(min=1e-12)
    for _ in range(iters):  # bisection on beta (doubling until bracketed)
        logits = -beta[:, None] * d
        p = torch.softmax(logits, 1)
        # entropy H = -sum p log p, with log p = logits - logsumexp(logits)
        h = -(p * (logits - torch.logsumexp(logits, 1, keepdim=True))).nan_to_num().sum(1)
        big = h > target  # too flat: raise beta
        lo = torch.where(big, beta, lo)
        hi = torch.where(big, hi, beta)
        beta = torch.where(hi.isinf(), beta * 2, (lo + hi) / 2)
    return torch.softmax(-beta[:, None] * d, 1)


def affinities(x: Tensor, perplexity: float = 30.0) -> Tensor:
    """Symmetric joint affinities ``P = (P_cond + P_cond^T) / (2N)`` (sum 1)."""
    p = conditional(x, perplexity)
    return (p + p.t()) / (2 * x.shape[0])


def tsne(x: Tensor, dim: int = 2, perplexity: float = 30.0, iters: int = 750,
         seed: int = 0, exaggeration: float = 12.0, exaggeration_iters: int = 250) -> Tensor:
    """Embed ``x`` ``(N, D)`` into ``(N, dim)`` by minimising ``KL(P || Q)`` with the
    Student-t kernel ``q_ij ~ (1 + |y_i - y_j|^2)^-1``.

    Gradient ``4 sum_j (p_ij - q_ij)(1 + |y_i - y_j|^2)^-1 (y_i - y_j)``; gradient descent
    with momentum (0.5, then 0.8), per-coordinate adaptive gains, early exaggeration of ``P``
    and learning rate ``max(N / exaggeration / 4, 50)``.
    """
    n = x.shape[0]
    if x.dim() != 2 or n < 3:
        raise ValueError(f"x must be (N, D) with N >= 3, got {tuple(x.shape)}")
    p = affinities(x, min(perplexity, (n - 1) / 3)).to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    y = 1e-4 * torch.randn(n, dim, generator=g)
    vel = torch.zeros_like(y)
    gains = torch.ones_like(y)
    lr = max(n / exaggeration / 4, 50.0)
    for it in range(iters):
        ex = exaggeration if it < exaggeration_iters else 1.0
        num = 1 / (1 + torch.cdist(y, y).square())
        num.fill_diagonal_(0)
        q = num / num.sum()
        w = (ex * p - q) * num
        grad = 4 * (w.sum(1, keepdim=True) * y - w @ y)
        same = (grad > 0) == (vel > 0)
        gains = torch.where(same, gains * 0.8, gains + 0.2).clamp(min=0.01)
        vel = (0.5 if it < exaggeration_iters else 0.8) * vel - lr * gains * grad
        y = y + vel
        y = y - y.mean(0)
    return y


def kl_divergence(p: Tensor, y: Tensor) -> float:
    """``KL(P || Q)`` of an embedding ``y`` (for diagnostics and tests)."""
    num = 1 / (1 + torch.cdist(y.double(), y.double()).square())
    num.fill_diagonal_(0)
    q = num / num.sum()
    p = p.double()
    m = p > 0
    return float((p[m] * (p[m] / q[m].clamp(min=1e-300)).log()).sum())
