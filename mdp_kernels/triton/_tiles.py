"""Tile helpers shared by the kernels (inlined by ``triton.jit``).

Feature tensors are strided ``(B, D, P)`` views; a pixel tile is loaded pixels-as-rows,
``(BLOCK_P, BLOCK_D)``. Offsets are formed in int64 (index ``.to(tl.int64)`` before the
stride multiply) so that views over more than 2**31 elements address correctly.
Prototypes are contiguous ``(C, D)``; class bias is float32 ``(C,)`` or ``(B, C)`` of 0 / -inf
(kernels offset ``bias_ptr`` to their image's row).
Boolean masks and CE targets come in as int32, for fp64 on Triton 3.6: it derives the fp64
MMA operand layout from the narrowest type feeding the operand, and an int8 (bool) mask
there gives a layout its fp64 MMA cannot lower ("fp64 don't support largeK MMA"); masks
from int64 targets trip its layout-conversion pass.
"""
import triton
import triton.language as tl

from ._launch import INTERPRET

# The interpreter's tl.dot multiplies bfloat16 tensors as their raw uint16 storage.
_BF16_DOT_IN_FP32 = tl.constexpr(INTERPRET)


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b with float32 accumulation (float64 for float64 operands); PREC is the fp32
    input precision (``_launch.precision``). bfloat16 operands go through float32 in the
    interpreter (exact)."""
    if _BF16_DOT_IN_FP32 and a.dtype.is_bf16():
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def row_ptrs(x_ptr, b, p, D, sb, sd, sp, BLOCK_D: tl.constexpr):
    """Pointers to x[b, d, p] as a (len(p), BLOCK_D) tile, and the d < D mask."""
    d = tl.arange(0, BLOCK_D)
    ptrs = (x_ptr + b.to(tl.int64) * sb + p.to(tl.int64)[:, None] * sp
            + d.to(tl.int64)[None, :] * sd)
    return ptrs, (d < D)[None, :]


@triton.jit
def load_rows(x_ptr, b, p, pmask, D, sb, sd, sp, BLOCK_D: tl.constexpr):
    """x[b, :, p] as a (len(p), BLOCK_D) tile; 0 where pmask is False or d >= D (masked
    pixels are not read)."""
    ptrs, dmask = row_ptrs(x_ptr, b, p, D, sb, sd, sp, BLOCK_D)
    return tl.load(ptrs, mask=pmask[:, None] & dmask, other=0.0)


@triton.jit
def store_rows(x_ptr, val, b, p, pmask, D, sb, sd, sp, BLOCK_D: tl.constexpr):
    ptrs, dmask = row_ptrs(x_ptr, b, p, D, sb, sd, sp, BLOCK_D)
    tl.store(ptrs, val.to(x_ptr.dtype.element_ty), mask=pmask[:, None] & dmask)


@triton.jit
def load_protos_t(p_ptr, c, C, D, BLOCK_D: tl.constexpr):
    """protos[c, :] transposed, a (BLOCK_D, len(c)) tile; 0 for c >= C or d >= D."""
    d = tl.arange(0, BLOCK_D)
    ptrs = p_ptr + c.to(tl.int64)[None, :] * D + d.to(tl.int64)[:, None]
    return tl.load(ptrs, mask=(c < C)[None, :] & (d < D)[:, None], other=0.0)


@triton.jit
def logits(f, pt, c, C, bias_ptr, scale, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """z = f @ pt * scale + bias, (BLOCK_P, BLOCK_C) in the accumulator dtype (float32, or
    float64 for float64 inputs); -inf for masked classes and c >= C. The scale (1/tau)
    multiplies the float32 accumulator, never the low-precision inputs."""
    z = mm(f, pt, PREC) * scale
    if HAS_BIAS:
        z = z + tl.load(bias_ptr + c, mask=c < C, other=-float("inf"))[None, :]
    else:
        z = tl.where((c < C)[None, :], z, -float("inf"))
    return z


@triton.jit
def lse_update(m, s, z):
    """One online-logsumexp step over the columns of z: running max m, running sum
    s = sum exp(z - m). A row that has seen only -inf keeps m = -inf, s = 0."""
    m_new = tl.maximum(m, tl.max(z, 1))
    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), 1)
    return m_new, s


@triton.jit
def count(mask):
    """Number of True entries of a 1-D mask (an int32 scalar)."""
    return tl.sum(mask.to(tl.int32), 0)


@triton.jit
def chunk_of(P, chunk, n_chunks):
    """(image b, first pixel, end pixel) of this program's pixel chunk (program axis 1 runs
    over B x n_chunks): the pixel range a class-tile reduction program owns."""
    split = tl.program_id(1)
    start = (split % n_chunks) * chunk
    return split // n_chunks, start, tl.minimum(start + chunk, P)


@triton.jit
def store_partial(part_ptr, acc, c, C, D, BLOCK_D: tl.constexpr):
    """This program's (BLOCK_C, BLOCK_D) share of a (C, D) reduction into its own slice of
    the (B x n_chunks, C, D) partial buffer (summed in a fixed order afterwards)."""
    d = tl.arange(0, BLOCK_D)
    ptrs = (part_ptr + tl.program_id(1).to(tl.int64) * C * D + c.to(tl.int64)[:, None] * D
            + d[None, :])
    tl.store(ptrs, acc, mask=(c < C)[:, None] & (d < D)[None, :])
