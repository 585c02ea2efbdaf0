"""Consistency backward: student and teacher logit tiles recomputed from lse_s, lse_t.

dzs_ik = g_i (softmax(zs)_ik - t_ik) / tau_s with t = softmax(zt) a constant. Same split
as the CE backward: a pixel-block program for dstudent (optionally also adding dprotos with
atomics), a class-tile program per pixel chunk for deterministic dprotos partials.
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
def _dz(fs, ft, pt, c, C, bias_ptr, lse_s, lse_t, g, scale_s, scale_t, HAS_BIAS: tl.constexpr,
        PREC: tl.constexpr):
    zs = logits(fs, pt, c, C, bias_ptr, scale_s, HAS_BIAS, PREC)
    zt = logits(ft, pt, c, C, bias_ptr, scale_t, HAS_BIAS, PREC)
    dz = g[:, None] * (tl.exp(zs - lse_s[:, None]) - tl.exp(zt - lse_t[:, None]))
    return dz * scale_s


@triton.jit
def _rows(mask_ptr, lss_ptr, lst_ptr, g_ptr, row, inb, HAS_MASK: tl.constexpr):
    valid = inb
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + row, mask=inb, other=0) != 0)
    lse_s = tl.load(lss_ptr + row, mask=valid, other=0.0)
    lse_t = tl.load(lst_ptr + row, mask=valid, other=0.0)
    g = tl.load(g_ptr + row, mask=valid, other=0.0)
    return valid, lse_s, lse_t, g


@triton.jit
def _con_bwd_feats(s_ptr, t_ptr, p_ptr, bias_ptr, mask_ptr, lss_ptr, lst_ptr, g_ptr,
                   ds_ptr, dp_ptr, P, C, D, ssb, ssd, ssp, stb, std, stp, sgb, sgd, sgp,
                   scale_s, scale_t, sbias, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                   NEED_F: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    bias_ptr += b.to(tl.int64) * sbias  # per-image class masks: bias row b
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    inb = p < P
    row = b.to(tl.int64) * P + p
    valid, lse_s, lse_t, g = _rows(mask_ptr, lss_ptr, lst_ptr, g_ptr, row, inb, HAS_MASK)
    ds = tl.zeros((BLOCK_P, BLOCK_D), lss_ptr.dtype.element_ty)
    if count(valid) > 0:
        fs = load_rows(s_ptr, b, p, valid, D, ssb, ssd, ssp, BLOCK_D)
        ft = load_rows(t_ptr, b, p, valid, D, stb, std, stp, BLOCK_D)
        d = tl.arange(0, BLOCK_D)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            pt = load_protos_t(p_ptr, c, C, D, BLOCK_D)
            dz = _dz(fs, ft, pt, c, C, bias_ptr, lse_s, lse_t, g, scale_s, scale_t,
                     HAS_BIAS, PREC).to(fs.dtype)
            if NEED_F:
                ds += mm(dz, tl.trans(pt), PREC)
            if ATOMIC:
                part = mm(tl.trans(dz), fs, PREC)
                tl.atomic_add(dp_ptr + c.to(tl.int64)[:, None] * D + d[None, :], part,
                              mask=(c < C)[:, None] & (d < D)[None, :])
    if NEED_F:
        store_rows(ds_ptr, ds, b, p, inb, D, sgb, sgd, sgp, BLOCK_D)


@triton.jit
def _con_bwd_protos(s_ptr, t_ptr, p_ptr, bias_ptr, mask_ptr, lss_ptr, lst_ptr, g_ptr,
                    part_ptr, P, C, D, ssb, ssd, ssp, stb, std, stp, scale_s, scale_t,
                    chunk, n_chunks, sbias, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                    PREC: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    b, start, end = chunk_of(P, chunk, n_chunks)
    bias_ptr += b.to(tl.int64) * sbias  # per-image class masks: bias row b
    pt = load_protos_t(p_ptr, c, C, D, BLOCK_D)
    acc = tl.zeros((BLOCK_C, BLOCK_D), lss_ptr.dtype.element_ty)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        row = b.to(tl.int64) * P + p
        valid, lse_s, lse_t, g = _rows(mask_ptr, lss_ptr, lst_ptr, g_ptr, row, p < end,
                                       HAS_MASK)
        if count(valid) > 0:
            fs = load_rows(s_ptr, b, p, valid, D, ssb, ssd, ssp, BLOCK_D)
            ft = load_rows(t_ptr, b, p, valid, D, stb, std, stp, BLOCK_D)
            dz = _dz(fs, ft, pt, c, C, bias_ptr, lse_s, lse_t, g, scale_s, scale_t,
                     HAS_BIAS, PREC).to(fs.dtype)
            acc += mm(tl.trans(dz), fs, PREC)
    store_partial(part_ptr, acc, c, C, D, BLOCK_D)


_INTERP = dict(BLOCK_P=64, BLOCK_C=64)
# as the CE backward, with a teacher tile and teacher logits besides the student's.
_feats = Kernel(_con_bwd_feats, grid_configs(("BLOCK_P", "BLOCK_C"), [
                    ((64, 32), 8, 2), ((64, 64), 8, 1), ((32, 64), 4, 2)] + SMALL
                    + [((16, 16), 4, 2)]),
                lambda m, bd: (m["BLOCK_P"] * (2 * bd + m["BLOCK_C"]), 2 * bd * m["BLOCK_C"],
                               m["BLOCK_P"] * (bd + 2 * m["BLOCK_C"])),
                _INTERP, key=["P", "C", "D"], reset_to_zero=["dp_ptr"])
_protos = Kernel(_con_bwd_protos, grid_configs(("BLOCK_P", "BLOCK_C"), [
                     ((32, 32), 8, 2), ((16, 32), 4, 1), ((64, 32), 8, 2), ((32, 16), 4, 2)]),
                 lambda m, bd: (m["BLOCK_C"] * (bd + m["BLOCK_P"]), 2 * m["BLOCK_P"] * bd,
                                m["BLOCK_C"] * (bd + 2 * m["BLOCK_P"])),
                 _INTERP, key=["P", "C", "D"])


def con_bwd(g_ce, student, teacher, protos, bias, mask, lse_s, lse_t, tau_s, tau_t,
            need_feats, need_protos):
    """Gradient of ce from ``con_fwd`` -> dstudent (B, D, P) or None, dprotos (C, D) or
    None (the teacher is a constant)."""
    bsz, d, npx = student.shape
    c = protos.shape[0]
    acc = acc_dtype(student.dtype)
    protos = protos.contiguous()
    ds = torch.empty_like(student) if need_feats else None
    if bsz * npx == 0:
        return ds, None if not need_protos else protos.new_zeros(c, d)
    dp = None
    if need_protos and not config.deterministic:
        dp = torch.zeros(c, d, dtype=acc, device=student.device)
    mask_ = lse_s if mask is None else mask.to(torch.int32)
    bias_ = lse_s if bias is None else bias.contiguous()
    common = (student, teacher, protos, bias_, mask_, lse_s.contiguous(), lse_t.contiguous(),
              g_ce.contiguous())
    flags = dict(sbias=bias_row_stride(bias), HAS_BIAS=bias is not None,
                 HAS_MASK=mask is not None,
                 PREC=precision(student.dtype), BLOCK_D=block_d(d, student.dtype))
    scales = (1.0 / tau_s, 1.0 / tau_t)
    if need_feats or dp is not None:
        out = ds if need_feats else student
        sink = lse_s.new_empty(1) if dp is None else dp  # autotune zeroes it between trials
        _feats[lambda m: (triton.cdiv(npx, m["BLOCK_P"]), bsz)](
            *common, out, sink, npx, c, d, *student.stride(), *teacher.stride(),
            *out.stride(), *scales, NEED_F=need_feats, ATOMIC=dp is not None, **flags)
    if need_protos and dp is None:
        def launch(part, chunk, n):
            _protos[lambda m: (triton.cdiv(c, m["BLOCK_C"]), bsz * n)](
                *common, part, npx, c, d, *student.stride(), *teacher.stride(), *scales,
                chunk, n, **flags)
        dp = _protos.reduce_classes(bsz, npx, c, d, acc, protos.device, launch)
    return ds, None if dp is None else dp.to(protos.dtype)
