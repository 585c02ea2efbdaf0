"""Pixel-to-prototype CE backward: logit tiles recomputed from the saved logsumexp.

dz_ik = (g_lse_i exp(z_ik - lse_i) + g_za_i [k = ta_i] + g_zb_i [k = tb_i] + g_zq_i sw_k) / tau.
- dfeats: a pixel-block program loops over class tiles, dF_i = sum_k dz_ik P_k.
- dprotos (deterministic): a class-tile program loops over the pixel blocks of one pixel
  chunk, dP_k = sum_i dz_ik f_i, into a per-chunk partial; partials are summed in order.
- dprotos (``deterministic = False``): the dfeats program adds dz^T f to dP with
  tl.atomic_add, saving the second logit recompute.
dz is cast to the input dtype before the gradient products (as an eager low-precision
backward does) so bf16/fp16 use tensor cores; float32 stays IEEE float32.
"""
import torch
import triton
import triton.language as tl

from ..config import config
from ..layout import acc_dtype
from ._launch import SMALL, Kernel, bias_row_stride, block_d, grid_configs, precision
from ._tiles import (chunk_of, count, load_protos_t, load_rows, logits, mm, store_partial,
                     store_rows)


@triton.jit
def _dz(z, c, C, lse, g_lse, ta, g_za, tb, g_zb, g_zq, sw_ptr, scale, HAS_TB: tl.constexpr,
        HAS_SW: tl.constexpr):
    dz = g_lse[:, None] * tl.exp(z - lse[:, None])
    dz += tl.where(c[None, :] == ta[:, None], g_za[:, None], 0.0)
    if HAS_TB:
        dz += tl.where(c[None, :] == tb[:, None], g_zb[:, None], 0.0)
    if HAS_SW:
        sw = tl.load(sw_ptr + c, mask=c < C, other=0.0).to(z.dtype)
        dz += g_zq[:, None] * sw[None, :]
    return dz * scale


@triton.jit
def _rows(ta_ptr, tb_ptr, lse_ptr, gl_ptr, ga_ptr, gb_ptr, row, inb, HAS_TB: tl.constexpr):
    """Per-pixel inputs of a pixel block; gradients are 0 on pixels without a target (the
    smoothing gradient g_zq is loaded with the same ``valid`` mask by the callers)."""
    ta = tl.load(ta_ptr + row, mask=inb, other=-1)
    tb = ta
    if HAS_TB:
        tb = tl.load(tb_ptr + row, mask=inb, other=-1)
    valid = (ta >= 0) | (tb >= 0)
    lse = tl.load(lse_ptr + row, mask=valid, other=0.0)
    g_lse = tl.load(gl_ptr + row, mask=valid, other=0.0)
    g_za = tl.load(ga_ptr + row, mask=valid, other=0.0)
    g_zb = g_za
    if HAS_TB:
        g_zb = tl.load(gb_ptr + row, mask=valid, other=0.0)
    return ta, tb, valid, lse, g_lse, g_za, g_zb


@triton.jit
def _ce_bwd_feats(f_ptr, p_ptr, ta_ptr, tb_ptr, bias_ptr, sw_ptr, lse_ptr, gl_ptr, ga_ptr,
                  gb_ptr, gq_ptr, df_ptr, dp_ptr, P, C, D, sfb, sfd, sfp, sgb, sgd, sgp, scale,
                  sbias, ssw, HAS_TB: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_SW: tl.constexpr, NEED_F: tl.constexpr, ATOMIC: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    bias_ptr += b.to(tl.int64) * sbias  # per-image class masks: bias row b
    sw_ptr += b.to(tl.int64) * ssw
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    inb = p < P
    row = b.to(tl.int64) * P + p
    ta, tb, valid, lse, g_lse, g_za, g_zb = _rows(ta_ptr, tb_ptr, lse_ptr, gl_ptr, ga_ptr,
                                                  gb_ptr, row, inb, HAS_TB)
    g_zq = g_lse
    if HAS_SW:
        g_zq = tl.load(gq_ptr + row, mask=valid, other=0.0)
    df = tl.zeros((BLOCK_P, BLOCK_D), lse_ptr.dtype.element_ty)
    if count(valid) > 0:
        f = load_rows(f_ptr, b, p, valid, D, sfb, sfd, sfp, BLOCK_D)
        d = tl.arange(0, BLOCK_D)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            pt = load_protos_t(p_ptr, c, C, D, BLOCK_D)
            z = logits(f, pt, c, C, bias_ptr, scale, HAS_BIAS, PREC)
            dz = _dz(z, c, C, lse, g_lse, ta, g_za, tb, g_zb, g_zq, sw_ptr, scale, HAS_TB,
                     HAS_SW).to(f.dtype)
            if NEED_F:
                df += mm(dz, tl.trans(pt), PREC)
            if ATOMIC:
                part = mm(tl.trans(dz), f, PREC)
                tl.atomic_add(dp_ptr + c.to(tl.int64)[:, None] * D + d[None, :], part,
                              mask=(c < C)[:, None] & (d < D)[None, :])
    if NEED_F:  # zeros for pixels without a target
        store_rows(df_ptr, df, b, p, inb, D, sgb, sgd, sgp, BLOCK_D)


@triton.jit
def _ce_bwd_protos(f_ptr, p_ptr, ta_ptr, tb_ptr, bias_ptr, sw_ptr, lse_ptr, gl_ptr, ga_ptr,
                   gb_ptr, gq_ptr, part_ptr, P, C, D, sfb, sfd, sfp, scale, chunk, n_chunks,
                   sbias, ssw, HAS_TB: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_SW: tl.constexpr, PREC: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    b, start, end = chunk_of(P, chunk, n_chunks)
    bias_ptr += b.to(tl.int64) * sbias  # per-image class masks: bias row b
    sw_ptr += b.to(tl.int64) * ssw
    pt = load_protos_t(p_ptr, c, C, D, BLOCK_D)
    acc = tl.zeros((BLOCK_C, BLOCK_D), lse_ptr.dtype.element_ty)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        row = b.to(tl.int64) * P + p
        ta, tb, valid, lse, g_lse, g_za, g_zb = _rows(ta_ptr, tb_ptr, lse_ptr, gl_ptr, ga_ptr,
                                                      gb_ptr, row, p < end, HAS_TB)
        g_zq = g_lse
        if HAS_SW:
            g_zq = tl.load(gq_ptr + row, mask=valid, other=0.0)
        if count(valid) > 0:
            f = load_rows(f_ptr, b, p, valid, D, sfb, sfd, sfp, BLOCK_D)
            z = logits(f, pt, c, C, bias_ptr, scale, HAS_BIAS, PREC)
            dz = _dz(z, c, C, lse, g_lse, ta, g_za, tb, g_zb, g_zq, sw_ptr, scale, HAS_TB,
                     HAS_SW).to(f.dtype)
            acc += mm(tl.trans(dz), f, PREC)
    store_partial(part_ptr, acc, c, C, D, BLOCK_D)


_INTERP = dict(BLOCK_P=64, BLOCK_C=64)
# f and dz, one prototype tile per step and its transposed copy; dF and z.
_feats = Kernel(_ce_bwd_feats, grid_configs(("BLOCK_P", "BLOCK_C"), [
                    ((64, 32), 8, 2), ((32, 64), 4, 2), ((64, 64), 8, 2), ((128, 32), 8, 2)]
                    + SMALL),
                lambda m, bd: (m["BLOCK_P"] * (bd + m["BLOCK_C"]), 2 * bd * m["BLOCK_C"],
                               m["BLOCK_P"] * (bd + m["BLOCK_C"])),
                _INTERP, key=["P", "C", "D"], reset_to_zero=["dp_ptr"])
# the prototype tile and dz^T, one pixel tile per step; dP and z.
_protos = Kernel(_ce_bwd_protos, grid_configs(("BLOCK_P", "BLOCK_C"), [
                     ((32, 32), 8, 2), ((64, 32), 8, 2), ((64, 64), 8, 2), ((32, 16), 4, 2)]),
                 lambda m, bd: (m["BLOCK_C"] * (bd + m["BLOCK_P"]), m["BLOCK_P"] * bd,
                                m["BLOCK_C"] * (bd + m["BLOCK_P"])),
                 _INTERP, key=["P", "C", "D"])


def ce_bwd(g_lse, g_za, g_zb, g_zq, feats, protos, ta, tb, bias, sw, lse, tau, need_feats,
           need_protos):
    """Gradients of (lse, za, zb, zq) from ``ce_fwd`` -> dfeats (B, D, P) feats.dtype or None,
    dprotos (C, D) protos.dtype or None."""
    bsz, d, npx = feats.shape
    c = protos.shape[0]
    acc = acc_dtype(feats.dtype)
    protos = protos.contiguous()
    ta = ta.to(torch.int32)
    tb_ = ta if tb is None else tb.to(torch.int32)
    bias_ = lse if bias is None else bias.contiguous()
    sw_ = lse if sw is None else sw.contiguous()
    g = [x.contiguous() for x in (g_lse, g_za, g_za if g_zb is None else g_zb)]
    gq = g_lse if g_zq is None else g_zq.contiguous()
    df = torch.empty_like(feats) if need_feats else None
    dp = None
    if need_protos and not config.deterministic:
        dp = torch.zeros(c, d, dtype=acc, device=feats.device)
    flags = dict(sbias=bias_row_stride(bias), ssw=bias_row_stride(sw), HAS_TB=tb is not None,
                 HAS_BIAS=bias is not None, HAS_SW=sw is not None,
                 PREC=precision(feats.dtype), BLOCK_D=block_d(d, feats.dtype))
    if bsz * npx == 0:
        return (df, None if not need_protos else protos.new_zeros(c, d))
    scale = 1.0 / tau
    if need_feats or dp is not None:
        out = df if need_feats else feats
        sink = lse.new_empty(1) if dp is None else dp  # autotune zeroes it between trials
        _feats[lambda m: (triton.cdiv(npx, m["BLOCK_P"]), bsz)](
            feats, protos, ta, tb_, bias_, sw_, lse, *g, gq, out, sink, npx, c, d,
            *feats.stride(), *out.stride(), scale, NEED_F=need_feats, ATOMIC=dp is not None,
            **flags)
    if need_protos and dp is None:
        def launch(part, chunk, n):
            _protos[lambda m: (triton.cdiv(c, m["BLOCK_C"]), bsz * n)](
                feats, protos, ta, tb_, bias_, sw_, lse, *g, gq, part, npx, c, d, *feats.stride(),
                scale, chunk, n, **flags)
        dp = _protos.reduce_classes(bsz, npx, c, d, acc, protos.device, launch)
    return df, None if dp is None else dp.to(protos.dtype)
