"""Per-image class sums and counts, and their backward (a gather).

Forward: grid (class tile, image x pixel chunk). A program streams over the pixel blocks
of its chunk and adds onehot(targets)^T f with tl.dot ((BLOCK_C, BLOCK_P) x (BLOCK_P, D));
the one-hot is exact in every dtype, products accumulate in float32 (float64 for float64).
Blocks with no pixel of the tile's classes are skipped. Per-chunk partials are summed in a
fixed order: deterministic, no atomics.
Backward: dfeats[b, :, p] = grad_sums[b, targets[b, p]], 0 where targets is -1.
"""
import torch
import triton
import triton.language as tl

from ..layout import acc_dtype
from ._launch import Kernel, block_d, grid_configs, precision
from ._tiles import chunk_of, count, load_rows, mm, store_rows


@triton.jit
def _class_sums(f_ptr, t_ptr, sums_ptr, counts_ptr, P, C, D, sfb, sfd, sfp, chunk, n_chunks,
                PREC: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    c0 = tl.program_id(0) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)  # b * n_chunks + chunk
    b, start, end = chunk_of(P, chunk, n_chunks)
    acc = tl.zeros((BLOCK_C, BLOCK_D), sums_ptr.dtype.element_ty)
    n = tl.zeros((BLOCK_C,), tl.int32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        t = tl.load(t_ptr + b.to(tl.int64) * P + p, mask=p < end, other=-1)
        hit = t[:, None] == c[None, :]  # (BLOCK_P, BLOCK_C)
        mine = (t >= c0) & (t < c0 + BLOCK_C)
        if count(mine) > 0:
            f = load_rows(f_ptr, b, p, mine, D, sfb, sfd, sfp, BLOCK_D)
            acc += mm(tl.trans(tl.where(hit, 1.0, 0.0).to(f.dtype)), f, PREC)
            n += tl.sum(hit.to(tl.int32), 0)
    d = tl.arange(0, BLOCK_D)
    cmask = c < C
    base = split.to(tl.int64) * C
    tl.store(sums_ptr + (base + c.to(tl.int64))[:, None] * D + d[None, :], acc,
             mask=cmask[:, None] & (d < D)[None, :])
    tl.store(counts_ptr + base + c, n, mask=cmask)


@triton.jit
def _class_sums_bwd(g_ptr, t_ptr, df_ptr, P, C, D, sdb, sdd, sdp,
                    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    t = tl.load(t_ptr + b.to(tl.int64) * P + p, mask=p < P, other=-1)
    src = (b.to(tl.int64) * C + tl.maximum(t, 0))[:, None] * D
    d = tl.arange(0, BLOCK_D)
    g = tl.load(g_ptr + src + d[None, :], mask=(t >= 0)[:, None] & (d < D)[None, :], other=0.0)
    store_rows(df_ptr, g, b, p, p < P, D, sdb, sdd, sdp, BLOCK_D)


# the one-hot tile, one feature tile per step; the class-sum accumulator.
_fwd = Kernel(_class_sums, grid_configs(("BLOCK_P", "BLOCK_C"), [
                  ((32, 32), 8, 2), ((64, 32), 8, 2), ((64, 64), 8, 2), ((32, 16), 4, 2)]),
              lambda m, bd: (m["BLOCK_C"] * m["BLOCK_P"], m["BLOCK_P"] * bd,
                             m["BLOCK_C"] * bd),
              dict(BLOCK_P=64, BLOCK_C=64), key=["P", "C", "D"])
# a gather: the rows in registers, loaded and again in the store layout (converted through
# shared memory).
_bwd = Kernel(_class_sums_bwd, [(dict(BLOCK_P=bp), w, 2) for bp, w in ((32, 4), (64, 8),
                                                                        (16, 4))],
              lambda m, bd: (m["BLOCK_P"] * bd, 0, 2 * m["BLOCK_P"] * bd), dict(BLOCK_P=64),
              key=["P", "D"])


def class_sums(feats, targets, num_classes):
    """feats (B, D, P) strided, targets (B, P) int64 in [-1, C) -> sums (B, C, D) in the
    accumulator dtype, counts (B, C) int64."""
    bsz, d, npx = feats.shape
    acc = acc_dtype(feats.dtype)
    if bsz * npx == 0:
        return (torch.zeros(bsz, num_classes, d, dtype=acc, device=feats.device),
                torch.zeros(bsz, num_classes, dtype=torch.int64, device=feats.device))
    n = _fwd.chunks(bsz, npx, num_classes)
    sums = torch.empty(bsz, n, num_classes, d, dtype=acc, device=feats.device)
    counts = torch.empty(bsz, n, num_classes, dtype=torch.int32, device=feats.device)
    _fwd[lambda m: (triton.cdiv(num_classes, m["BLOCK_C"]), bsz * n)](
        feats, targets.contiguous(), sums, counts, npx, num_classes, d, *feats.stride(),
        triton.cdiv(npx, n), n, PREC=precision(feats.dtype), BLOCK_D=block_d(d, feats.dtype))
    return sums.sum(1), counts.sum(1, dtype=torch.int64)


def class_sums_bwd(grad_sums, feats, targets):
    """grad_sums (B, C, D) -> dfeats (B, D, P) of feats' dtype (and strides where dense)."""
    bsz, d, npx = feats.shape
    df = torch.empty_like(feats)
    if bsz * npx == 0:
        return df
    _bwd[lambda m: (triton.cdiv(npx, m["BLOCK_P"]), bsz)](
        grad_sums.contiguous(), targets.contiguous(), df, npx, grad_sums.shape[1], d,
        *df.stride(), BLOCK_D=block_d(d, feats.dtype))
    return df
