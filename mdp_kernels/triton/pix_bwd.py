"""Pixel-to-pixel logsumexp backward, flash-attention style (probabilities recomputed
from the saved lse; a_ij = g_i exp(q_i . k_j / tau - lse_i)).

- dq: grid (query block, image), loop over key blocks, dq_i = sum_j a_ij k_j / tau.
- dk: grid (key block, image), loop over query blocks, dk_j = sum_i a_ij q_i / tau.
Each output row is owned by one program: no atomics, deterministic.
"""
import torch
import triton
import triton.language as tl

from ._launch import SMALL, Kernel, block_d, grid_configs, precision
from ._tiles import count, load_rows, mm, store_rows
from .pix_fwd import load_cols


@triton.jit
def _pix_bwd_q(q_ptr, k_ptr, qm_ptr, km_ptr, lse_ptr, g_ptr, dq_ptr, P, PK, D,
               sqb, sqd, sqp, skb, skd, skp, sgb, sgd, sgp, scale, PREC: tl.constexpr,
               BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    i = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row = b.to(tl.int64) * P + i
    qv = tl.load(qm_ptr + row, mask=i < P, other=0) != 0
    dq = tl.zeros((BLOCK_Q, BLOCK_D), lse_ptr.dtype.element_ty)
    if count(qv) > 0:
        q = load_rows(q_ptr, b, i, qv, D, sqb, sqd, sqp, BLOCK_D)
        lse = tl.load(lse_ptr + row, mask=qv, other=0.0)
        g = tl.load(g_ptr + row, mask=qv, other=0.0) * scale
        for j0 in range(0, PK, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            kv = tl.load(km_ptr + b.to(tl.int64) * PK + j, mask=j < PK, other=0) != 0
            kt = load_cols(k_ptr, b, j, kv, D, skb, skd, skp, BLOCK_D)
            z = mm(q, kt, PREC) * scale
            a = tl.where(kv[None, :], g[:, None] * tl.exp(z - lse[:, None]), 0.0)
            dq += mm(a.to(q.dtype), tl.trans(kt), PREC)
    store_rows(dq_ptr, dq, b, i, i < P, D, sgb, sgd, sgp, BLOCK_D)


@triton.jit
def _pix_bwd_k(q_ptr, k_ptr, qm_ptr, km_ptr, lse_ptr, g_ptr, dk_ptr, P, PK, D,
               sqb, sqd, sqp, skb, skd, skp, sgb, sgd, sgp, scale, PREC: tl.constexpr,
               BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    j = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    kv = tl.load(km_ptr + b.to(tl.int64) * PK + j, mask=j < PK, other=0) != 0
    dk = tl.zeros((BLOCK_K, BLOCK_D), lse_ptr.dtype.element_ty)
    if count(kv) > 0:
        k = load_rows(k_ptr, b, j, kv, D, skb, skd, skp, BLOCK_D)
        for i0 in range(0, P, BLOCK_Q):
            i = i0 + tl.arange(0, BLOCK_Q)
            row = b.to(tl.int64) * P + i
            qv = tl.load(qm_ptr + row, mask=i < P, other=0) != 0
            if count(qv) > 0:
                qt = load_cols(q_ptr, b, i, qv, D, sqb, sqd, sqp, BLOCK_D)
                lse = tl.load(lse_ptr + row, mask=qv, other=0.0)
                g = tl.load(g_ptr + row, mask=qv, other=0.0) * scale
                zt = mm(k, qt, PREC) * scale  # (BLOCK_K, BLOCK_Q)
                at = tl.where(kv[:, None], g[None, :] * tl.exp(zt - lse[None, :]), 0.0)
                dk += mm(at.to(k.dtype), tl.trans(qt), PREC)
    store_rows(dk_ptr, dk, b, j, j < PK, D, sgb, sgd, sgp, BLOCK_D)


_INTERP = dict(BLOCK_Q=64, BLOCK_K=64)
# the owned rows' tile (plus the probabilities staged for the second product), one tile of
# the other side per step; the gradient accumulator and the score tile.
_dq = Kernel(_pix_bwd_q, grid_configs(("BLOCK_Q", "BLOCK_K"), [
                 ((64, 32), 8, 2), ((128, 32), 8, 2), ((64, 64), 8, 2)] + SMALL),
             lambda m, bd: (m["BLOCK_Q"] * (bd + m["BLOCK_K"]), bd * m["BLOCK_K"],
                            m["BLOCK_Q"] * (bd + m["BLOCK_K"])),
             _INTERP, key=["P", "PK", "D"])
_dk = Kernel(_pix_bwd_k, grid_configs(("BLOCK_Q", "BLOCK_K"), [
                 ((64, 32), 8, 2), ((64, 64), 8, 2)] + SMALL),
             lambda m, bd: (m["BLOCK_K"] * (bd + m["BLOCK_Q"]), bd * m["BLOCK_Q"],
                            m["BLOCK_K"] * (bd + m["BLOCK_Q"])),
             _INTERP, key=["P", "PK", "D"])


def pix_bwd(g_lse, q, k, qmask, kmask, lse, tau, need_q, need_k):
    """Gradient of lse from ``pix_fwd`` -> dq (B, D, P) or None, dk (B, D, Pk) or None."""
    bsz, d, npx = q.shape
    npk = k.shape[2]
    dq = torch.zeros_like(q) if need_q else None
    dk = torch.zeros_like(k) if need_k else None
    if bsz * npx * npk == 0:
        return dq, dk
    args = (q, k, qmask.to(torch.int32), kmask.to(torch.int32), lse.contiguous(),
            g_lse.contiguous())
    for out, kern, n, blk in ((dq, _dq, npx, "BLOCK_Q"), (dk, _dk, npk, "BLOCK_K")):
        if out is not None:
            kern[lambda m, n=n, blk=blk: (triton.cdiv(n, m[blk]), bsz)](
                *args, out, npx, npk, d, *q.stride(), *k.stride(), *out.stride(), 1.0 / tau,
                PREC=precision(q.dtype), BLOCK_D=block_d(d, q.dtype))
    return dq, dk
