"""Consistency forward (CE / KL of teacher vs student prototype softmaxes) in one pass.

A program owns BLOCK_P pixels and streams over class tiles, computing the student and
teacher logits of the tile from one prototype load. Online, in log space:
m_s, s_s (student logsumexp), m_t, s_t (teacher), and the teacher-weighted sums
a = sum_k e^{zt_k - m_t} zs_k and e = sum_k e^{zt_k - m_t} zt_k, rescaled with s_t. Then
ce = lse_s - a / s_t and ent = lse_t - e / s_t (since sum_k t_k = 1).
"""
import torch
import triton
import triton.language as tl

from ..layout import acc_dtype
from ._launch import SMALL, Kernel, bias_row_stride, block_d, grid_configs, precision
from ._tiles import count, load_protos_t, load_rows, logits, lse_update


@triton.jit
def _con_fwd(s_ptr, t_ptr, p_ptr, bias_ptr, mask_ptr, ce_ptr, ent_ptr, lss_ptr, lst_ptr,
             P, C, D, ssb, ssd, ssp, stb, std, stp, scale_s, scale_t,
             sbias, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    bias_ptr += b.to(tl.int64) * sbias  # per-image class masks: bias row b
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    row = b.to(tl.int64) * P + p
    valid = p < P
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + row, mask=p < P, other=0) != 0)
    if count(valid) == 0:
        return  # outputs are zero-initialised
    fs = load_rows(s_ptr, b, p, valid, D, ssb, ssd, ssp, BLOCK_D)
    ft = load_rows(t_ptr, b, p, valid, D, stb, std, stp, BLOCK_D)
    acc = ce_ptr.dtype.element_ty
    m_s = tl.full((BLOCK_P,), -float("inf"), acc)
    m_t = tl.full((BLOCK_P,), -float("inf"), acc)
    s_s = tl.zeros((BLOCK_P,), acc)
    s_t = tl.zeros((BLOCK_P,), acc)
    a = tl.zeros((BLOCK_P,), acc)
    e = tl.zeros((BLOCK_P,), acc)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        pt = load_protos_t(p_ptr, c, C, D, BLOCK_D)
        zs = logits(fs, pt, c, C, bias_ptr, scale_s, HAS_BIAS, PREC)
        zt = logits(ft, pt, c, C, bias_ptr, scale_t, HAS_BIAS, PREC)
        m_s, s_s = lse_update(m_s, s_s, zs)
        m_new = tl.maximum(m_t, tl.max(zt, 1))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m_t - m_ref)
        w = tl.exp(zt - m_ref[:, None])
        s_t = s_t * alpha + tl.sum(w, 1)
        # masked classes have w = 0 and z = -inf: keep them out of the products
        a = a * alpha + tl.sum(w * tl.where(w > 0, zs, 0.0), 1)
        e = e * alpha + tl.sum(w * tl.where(w > 0, zt, 0.0), 1)
        m_t = m_new
    lse_s = m_s + tl.log(s_s)
    lse_t = m_t + tl.log(s_t)
    tl.store(ce_ptr + row, tl.where(valid, lse_s - a / s_t, 0.0), mask=p < P)
    tl.store(ent_ptr + row, tl.where(valid, lse_t - e / s_t, 0.0), mask=p < P)
    tl.store(lss_ptr + row, tl.where(valid, lse_s, 0.0), mask=p < P)
    tl.store(lst_ptr + row, tl.where(valid, lse_t, 0.0), mask=p < P)


# student and teacher tiles, one prototype tile per step; both logit tiles.
_kernel = Kernel(_con_fwd, grid_configs(("BLOCK_P", "BLOCK_C"), [
                     ((64, 32), 8, 2), ((32, 64), 4, 2), ((64, 64), 8, 2)] + SMALL),
                 lambda m, bd: (2 * m["BLOCK_P"] * bd, bd * m["BLOCK_C"],
                                2 * m["BLOCK_P"] * m["BLOCK_C"]),
                 interp=dict(BLOCK_P=64, BLOCK_C=64), key=["P", "C", "D"])


def con_fwd(student, teacher, protos, bias, mask, tau_s, tau_t):
    """student/teacher (B, D, P) strided, protos (C, D), bias None or (C,), mask None or
    bool (B, P) -> ce, ent, lse_s, lse_t (B, P) in the accumulator dtype."""
    bsz, d, npx = student.shape
    c = protos.shape[0]
    out = [torch.zeros(bsz, npx, dtype=acc_dtype(student.dtype), device=student.device)
           for _ in range(4)]
    if bsz * npx == 0:
        return tuple(out)
    mask_ = out[0] if mask is None else mask.to(torch.int32)
    bias_ = out[0] if bias is None else bias.contiguous()
    _kernel[lambda m: (triton.cdiv(npx, m["BLOCK_P"]), bsz)](
        student, teacher, protos.contiguous(), bias_, mask_, *out, npx, c, d, *student.stride(),
        *teacher.stride(), 1.0 / tau_s, 1.0 / tau_t, sbias=bias_row_stride(bias),
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None, PREC=precision(student.dtype),
        BLOCK_D=block_d(d, student.dtype))
    return tuple(out)
