"""Pixel-to-pixel logsumexp forward, flash-attention style, one image at a time.

Grid (query block, image); a program streams over the key blocks of its image:
s = q k^T / tau, -inf on invalid keys, online max / sum. Only lse (B, P) is written,
0 for invalid queries and for images without a valid key.
"""
import torch
import triton
import triton.language as tl

from ..layout import acc_dtype
from ._launch import SMALL, Kernel, block_d, grid_configs, precision
from ._tiles import count, load_rows, lse_update, mm


@triton.jit
def load_cols(x_ptr, b, j, jmask, D, sb, sd, sp, BLOCK_D: tl.constexpr):
    """x[b, :, j] as a (BLOCK_D, len(j)) tile (pixels as columns), 0 outside."""
    d = tl.arange(0, BLOCK_D)
    ptrs = (x_ptr + b.to(tl.int64) * sb + j.to(tl.int64)[None, :] * sp
            + d.to(tl.int64)[:, None] * sd)
    return tl.load(ptrs, mask=jmask[None, :] & (d < D)[:, None], other=0.0)


@triton.jit
def _pix_fwd(q_ptr, k_ptr, qm_ptr, km_ptr, lse_ptr, P, PK, D, sqb, sqd, sqp, skb, skd, skp,
             scale, PREC: tl.constexpr,
             BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    i = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row = b.to(tl.int64) * P + i
    qv = tl.load(qm_ptr + row, mask=i < P, other=0) != 0
    if count(qv) == 0:
        return  # lse is zero-initialised
    q = load_rows(q_ptr, b, i, qv, D, sqb, sqd, sqp, BLOCK_D)
    acc = lse_ptr.dtype.element_ty
    m = tl.full((BLOCK_Q,), -float("inf"), acc)
    s = tl.zeros((BLOCK_Q,), acc)
    for j0 in range(0, PK, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        kv = tl.load(km_ptr + b.to(tl.int64) * PK + j, mask=j < PK, other=0) != 0
        kt = load_cols(k_ptr, b, j, kv, D, skb, skd, skp, BLOCK_D)
        z = mm(q, kt, PREC) * scale
        m, s = lse_update(m, s, tl.where(kv[None, :], z, -float("inf")))
    tl.store(lse_ptr + row, tl.where(qv & (s > 0), m + tl.log(s), 0.0), mask=i < P)


# the query tile, one key tile per step; the score tile.
_kernel = Kernel(_pix_fwd, grid_configs(("BLOCK_Q", "BLOCK_K"), [
                     ((128, 64), 8, 2), ((64, 64), 4, 2), ((128, 128), 8, 2), ((64, 16), 4, 2)]
                 + SMALL),
                 lambda m, bd: (m["BLOCK_Q"] * bd, bd * m["BLOCK_K"], m["BLOCK_Q"] * m["BLOCK_K"]),
                 interp=dict(BLOCK_Q=64, BLOCK_K=64), key=["P", "PK", "D"])


def pix_fwd(q, k, qmask, kmask, tau):
    """q (B, D, P), k (B, D, Pk) strided, qmask (B, P), kmask (B, Pk) bool ->
    lse (B, P) in the accumulator dtype."""
    bsz, d, npx = q.shape
    npk = k.shape[2]
    lse = torch.zeros(bsz, npx, dtype=acc_dtype(q.dtype), device=q.device)
    if bsz * npx * npk == 0:
        return lse
    _kernel[lambda m: (triton.cdiv(npx, m["BLOCK_Q"]), bsz)](
        q, k, qmask.to(torch.int32), kmask.to(torch.int32), lse, npx, npk, d, *q.stride(),
        *k.stride(), 1.0 / tau, PREC=precision(q.dtype), BLOCK_D=block_d(d, q.dtype))
    return lse
