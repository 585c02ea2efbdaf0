"""Per-pixel L2 normalisation (normalize_fwd / normalize_bwd): F.normalize over D of a
(B, D, P) view and its backward.

One program per block of pixels loops over D in tiles twice: the squared norms (or the row
dots y . g for the backward), then the scaled rows; the second read of a block hits the
cache, so each direction reads the features from memory once. Any D, any strides.
"""
import torch
import triton
import triton.language as tl

from ..layout import acc_dtype
from ._launch import INTERPRET, tl_acc

BLOCK_P = 128 if INTERPRET else 64
BLOCK_D = 128 if INTERPRET else 64


@triton.jit
def _tile(ptr, b, p, d, sb, sd, sp, P, D, ACC: tl.constexpr):
    m = (p < P)[:, None] & (d < D)[None, :]
    off = b * sb + p[:, None] * sp + d[None, :] * sd
    return tl.load(ptr + off, mask=m, other=0.0).to(ACC), off, m


@triton.jit
def _cast(v, ptr, EMULATE_RTNE: tl.constexpr):
    """fp32 ``v`` in ``ptr``'s element type, rounded to nearest even as on the GPU. The
    interpreter truncates fp32 -> bf16, which would double the error of the normalised
    features that the loss multiplies, so there the rounding is done on the bits first
    (finite values only: NaN stays NaN for the finiteness check)."""
    if EMULATE_RTNE and ptr.dtype.element_ty == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v == v, u.to(tl.float32, bitcast=True), v)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _normalize_fwd(x_ptr, y_ptr, n_ptr, P, D, sxb, sxd, sxp, syb, syd, syp, eps,
                   ACC: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ss = tl.zeros((BLOCK_P,), ACC)
    for d0 in range(0, D, BLOCK_D):
        x, _, _ = _tile(x_ptr, b, p, d0 + tl.arange(0, BLOCK_D), sxb, sxd, sxp, P, D, ACC)
        ss += tl.sum(x * x, 1)
    r = tl.sqrt(ss)
    tl.store(n_ptr + b * P + p, r, mask=p < P)
    inv = 1.0 / tl.where(r < eps, eps, r)  # NaN stays NaN, as torch's clamp_min
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x, _, m = _tile(x_ptr, b, p, d, sxb, sxd, sxp, P, D, ACC)
        yo = b * syb + p[:, None] * syp + d[None, :] * syd
        tl.store(y_ptr + yo, _cast(x * inv[:, None], y_ptr, INTERPRETED), mask=m)


@triton.jit
def _normalize_bwd(g_ptr, y_ptr, n_ptr, dx_ptr, P, D, sgb, sgd, sgp, syb, syd, syp,
                   sxb, sxd, sxp, eps, ACC: tl.constexpr, INTERPRETED: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    dot = tl.zeros((BLOCK_P,), ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        g, _, _ = _tile(g_ptr, b, p, d, sgb, sgd, sgp, P, D, ACC)
        y, _, _ = _tile(y_ptr, b, p, d, syb, syd, syp, P, D, ACC)
        dot += tl.sum(g * y, 1)
    r = tl.load(n_ptr + b * P + p, mask=p < P, other=1.0)
    proj = r >= eps  # below eps the clamp passes no gradient to the norm
    inv = 1.0 / tl.where(proj, r, eps)
    dot = tl.where(proj, dot, 0.0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        g, _, m = _tile(g_ptr, b, p, d, sgb, sgd, sgp, P, D, ACC)
        y, _, _ = _tile(y_ptr, b, p, d, syb, syd, syp, P, D, ACC)
        xo = b * sxb + p[:, None] * sxp + d[None, :] * sxd
        dx = (g - y * dot[:, None]) * inv[:, None]
        tl.store(dx_ptr + xo, _cast(dx, dx_ptr, INTERPRETED), mask=m)


def normalize_fwd(x, eps):
    """x (B, D, P) strided -> (y like x, norm (B, P) acc)."""
    bsz, d, npx = x.shape
    y = torch.empty_like(x)
    norm = torch.empty(bsz, npx, dtype=acc_dtype(x.dtype), device=x.device)
    if bsz * npx:
        _normalize_fwd[(triton.cdiv(npx, BLOCK_P), bsz)](
            x, y, norm, npx, d, *x.stride(), *y.stride(), float(eps), ACC=tl_acc(x.dtype),
            INTERPRETED=INTERPRET, BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D)
    return y, norm


def normalize_bwd(grad, y, norm, eps):
    """grad, y (B, D, P), norm (B, P) -> dx like y."""
    bsz, d, npx = y.shape
    dx = torch.empty_like(y)
    if bsz * npx:
        _normalize_bwd[(triton.cdiv(npx, BLOCK_P), bsz)](
            grad, y, norm.contiguous(), dx, npx, d, *grad.stride(), *y.stride(), *dx.stride(),
            float(eps), ACC=tl_acc(y.dtype), INTERPRETED=INTERPRET, BLOCK_P=BLOCK_P,
            BLOCK_D=BLOCK_D)
    return dx
