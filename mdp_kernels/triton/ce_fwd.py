"""Pixel-to-prototype CE forward: per-pixel logsumexp, the two target logits and label
smoothing's weighted logit sum.

A program owns BLOCK_P pixels of one image and streams over class tiles: z = f P^T / tau
(+ class bias) per tile, online max / sum, the logits at the targets ta, tb and
zq = sum_k sw_k z_k. Only lse, za, zb, zq (B, P) are written; the (P, C) logits never exist. Pixels without a target
are masked out of the loads, a block without any exits before its first dot.
"""
import torch
import triton
import triton.language as tl

from ..layout import acc_dtype
from ._launch import FWD_CONFIGS, Kernel, bias_row_stride, block_d, precision
from ._tiles import count, load_protos_t, load_rows, logits, lse_update


@triton.jit
def _ce_fwd(f_ptr, p_ptr, ta_ptr, tb_ptr, bias_ptr, sw_ptr, lse_ptr, za_ptr, zb_ptr, zq_ptr,
            P, C, D, sfb, sfd, sfp, scale,
            sbias, ssw, HAS_TB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SW: tl.constexpr,
            PREC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
            BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    bias_ptr += b.to(tl.int64) * sbias  # per-image class masks: bias row b
    sw_ptr += b.to(tl.int64) * ssw
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    row = b.to(tl.int64) * P + p
    ta = tl.load(ta_ptr + row, mask=p < P, other=-1)
    tb = ta
    if HAS_TB:
        tb = tl.load(tb_ptr + row, mask=p < P, other=-1)
    valid = (ta >= 0) | (tb >= 0)
    if count(valid) == 0:
        return  # outputs are zero-initialised
    f = load_rows(f_ptr, b, p, valid, D, sfb, sfd, sfp, BLOCK_D)
    acc = lse_ptr.dtype.element_ty
    m = tl.full((BLOCK_P,), -float("inf"), acc)
    s = tl.zeros((BLOCK_P,), acc)
    za = tl.zeros((BLOCK_P,), acc)
    zb = tl.zeros((BLOCK_P,), acc)
    zq = tl.zeros((BLOCK_P,), acc)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        z = logits(f, load_protos_t(p_ptr, c, C, D, BLOCK_D), c, C, bias_ptr, scale, HAS_BIAS,
                   PREC)
        m, s = lse_update(m, s, z)
        za += tl.sum(tl.where(c[None, :] == ta[:, None], z, 0.0), 1)
        if HAS_TB:
            zb += tl.sum(tl.where(c[None, :] == tb[:, None], z, 0.0), 1)
        if HAS_SW:  # masked classes have sw = 0 and z = -inf: left out, not 0 * inf
            sw = tl.load(sw_ptr + c, mask=c < C, other=0.0).to(acc)
            zq += tl.sum(tl.where((sw != 0.0)[None, :], z, 0.0) * sw[None, :], 1)
    tl.store(lse_ptr + row, tl.where(valid, m + tl.log(s), 0.0), mask=p < P)
    tl.store(za_ptr + row, za, mask=p < P)
    if HAS_TB:
        tl.store(zb_ptr + row, zb, mask=p < P)
    if HAS_SW:
        tl.store(zq_ptr + row, tl.where(valid, zq, 0.0), mask=p < P)


_kernel = Kernel(_ce_fwd, FWD_CONFIGS, lambda m, bd: (m["BLOCK_P"] * bd, bd * m["BLOCK_C"],
                                                      m["BLOCK_P"] * m["BLOCK_C"]),
                 interp=dict(BLOCK_P=64, BLOCK_C=64), key=["P", "C", "D"])


def ce_fwd(feats, protos, ta, tb, bias, sw, tau):
    """feats (B, D, P) strided, protos (C, D), ta/tb (B, P) int64 (-1: no target), bias and
    sw None, (C,) or (B, C) -> lse, za, zb, zq (B, P) in the accumulator dtype."""
    bsz, d, npx = feats.shape
    c = protos.shape[0]
    out = [torch.zeros(bsz, npx, dtype=acc_dtype(feats.dtype), device=feats.device)
           for _ in range(4)]
    if bsz * npx == 0:
        return tuple(out)
    ta = ta.to(torch.int32)
    tb_ = ta if tb is None else tb.to(torch.int32)
    bias_ = out[0] if bias is None else bias.contiguous()
    sw_ = out[0] if sw is None else sw.contiguous()
    _kernel[lambda m: (triton.cdiv(npx, m["BLOCK_P"]), bsz)](
        feats, protos.contiguous(), ta, tb_, bias_, sw_, *out, npx, c, d, *feats.stride(),
        1.0 / tau, sbias=bias_row_stride(bias), ssw=bias_row_stride(sw), HAS_TB=tb is not None,
        HAS_BIAS=bias is not None, HAS_SW=sw is not None, PREC=precision(feats.dtype),
        BLOCK_D=block_d(d, feats.dtype))
    return tuple(out)
