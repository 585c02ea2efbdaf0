"""Pseudo-labels: a streaming argmax of f . P_k + bias_k over class tiles (no temperature).

Per tile: the tile max and the lowest class index attaining it; across tiles the running
best is replaced only by a strictly larger score, so ties keep the lowest index.
"""
import torch
import triton
import triton.language as tl

from ._launch import FWD_CONFIGS, Kernel, bias_row_stride, block_d, precision, tl_acc
from ._tiles import load_protos_t, load_rows, logits


@triton.jit
def _pseudo_label(f_ptr, p_ptr, bias_ptr, lab_ptr, score_ptr, P, C, D, sfb, sfd, sfp,
                  threshold, ignore_index, sbias, ACC: tl.constexpr, HAS_BIAS: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    bias_ptr += b.to(tl.int64) * sbias  # per-image class masks: bias row b
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    row = b.to(tl.int64) * P + p
    f = load_rows(f_ptr, b, p, p < P, D, sfb, sfd, sfp, BLOCK_D)
    best = tl.full((BLOCK_P,), -float("inf"), ACC)
    arg = tl.zeros((BLOCK_P,), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        z = logits(f, load_protos_t(p_ptr, c, C, D, BLOCK_D), c, C, bias_ptr, 1.0, HAS_BIAS,
                   PREC)
        top = tl.max(z, 1)
        first = tl.min(tl.where(z == top[:, None], c[None, :], C), 1)
        better = top > best
        best = tl.where(better, top, best)
        arg = tl.where(better, first, arg)
    lab = tl.where(best >= threshold, arg.to(tl.int64), ignore_index)
    tl.store(lab_ptr + row, lab, mask=p < P)
    tl.store(score_ptr + row, best.to(tl.float32), mask=p < P)


_kernel = Kernel(_pseudo_label, FWD_CONFIGS,
                 lambda m, bd: (m["BLOCK_P"] * bd, bd * m["BLOCK_C"], m["BLOCK_P"] * m["BLOCK_C"]),
                 dict(BLOCK_P=64, BLOCK_C=64), key=["P", "C", "D"])


def pseudo_label(feats, protos, bias, threshold, ignore_index):
    """feats (B, D, P) strided, protos (C, D), bias None, (C,) or (B, C) -> labels (B, P) int64,
    scores (B, P) float32."""
    bsz, d, npx = feats.shape
    c = protos.shape[0]
    labels = torch.empty(bsz, npx, dtype=torch.int64, device=feats.device)
    scores = torch.empty(bsz, npx, dtype=torch.float32, device=feats.device)
    if bsz * npx == 0:
        return labels, scores
    _kernel[lambda m: (triton.cdiv(npx, m["BLOCK_P"]), bsz)](
        feats, protos.contiguous(), scores if bias is None else bias.contiguous(), labels,
        scores, npx, c, d, *feats.stride(), float(threshold), int(ignore_index),
        ACC=tl_acc(feats.dtype),
        sbias=bias_row_stride(bias), HAS_BIAS=bias is not None, PREC=precision(feats.dtype),
        BLOCK_D=block_d(d, feats.dtype))
    return labels, scores
