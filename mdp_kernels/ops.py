"""``torch.library`` registration (namespace ``mdp``) of every kernel phase.

Each op is a ``custom_op`` whose body runs the kernel that ``dispatch`` resolved (the
``backend`` argument is always a concrete kernel backend here), a fake implementation
that gives output shapes to ``torch.compile``, and, for the differentiable ops, an
autograd formula that calls the matching backward op. Finiteness checks run inside the op
bodies so they also run inside compiled graphs (the other value checks are ``checks.py``).
Temperatures are 0-d tensors, read inside the bodies, so that a new value is not a new
graph under ``torch.compile``. The losses are differentiable once: a double backward raises
an error that names the op (``_once``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .checks import finite_or_raise
from .layout import acc_dtype


def _empty_grad(like: Tensor, needed: bool) -> Tensor:
    return torch.empty(like.shape if needed else (0,), dtype=like.dtype, device=like.device)


def _grad(t: Tensor) -> Tensor:
    """Kernels take contiguous grads."""
    return t.contiguous()


def _input_grads(op, **grads: Tensor | None) -> tuple:
    """What ``op``'s backward returns: the given gradients by input name, None for the
    other inputs, in the order of the op's schema."""
    return tuple(grads.get(a.name) for a in op._opoverload._schema.arguments)


def _once(op: str, backward):
    """``backward`` whose gradients, under ``create_graph=True``, pass through a node that
    raises when differentiated again, with a message naming the op (the backward kernels
    have no derivative of their own)."""
    def wrapped(ctx, *grads):
        out = backward(ctx, *grads)
        live = [i for i, g in enumerate(out) if g is not None and g.requires_grad]
        if not (torch.is_grad_enabled() and live):
            return out
        err = torch._C._functions.DelayedError(
            f"mdp::{op} is differentiable once: double backward (e.g. a gradient penalty) is "
            f"not supported by the fused kernels; use backend='reference'", len(live))
        marked = err(*[out[i] for i in live])
        marked = (marked,) if isinstance(marked, Tensor) else marked
        out = list(out)
        for i, g in zip(live, marked):
            out[i] = g
        return tuple(out)
    return wrapped


# ---------------------------------------------------------------- class sums
@torch.library.custom_op("mdp::class_sums", mutates_args=())
def class_sums(feats: Tensor, targets: Tensor, num_classes: int, backend: str
               ) -> tuple[Tensor, Tensor]:
    return dispatch.kernel("class_sums", backend)(feats=feats, targets=targets,
                                                  num_classes=num_classes)


@class_sums.register_fake
def _(feats, targets, num_classes, backend):
    b, d, _ = feats.shape
    return (feats.new_empty((b, num_classes, d), dtype=acc_dtype(feats.dtype)),
            feats.new_empty((b, num_classes), dtype=torch.int64))


@torch.library.custom_op("mdp::class_sums_bwd", mutates_args=())
def class_sums_bwd(grad_sums: Tensor, feats: Tensor, targets: Tensor, backend: str) -> Tensor:
    return dispatch.kernel("class_sums_bwd", backend)(grad_sums=grad_sums.contiguous(),
                                                      feats=feats, targets=targets)


@class_sums_bwd.register_fake
def _(grad_sums, feats, targets, backend):
    return torch.empty(feats.shape, dtype=feats.dtype, device=feats.device)


def _class_sums_setup(ctx, inputs, output):
    feats, targets, _, backend = inputs
    ctx.save_for_backward(feats, targets)
    ctx.backend = backend


def _class_sums_backward(ctx, grad_sums, grad_counts):
    feats, targets = ctx.saved_tensors
    return _input_grads(class_sums, feats=class_sums_bwd(grad_sums, feats, targets, ctx.backend))


class_sums.register_autograd(_once("class_sums", _class_sums_backward),
                             setup_context=_class_sums_setup)


# ---------------------------------------------------------------- pixel-to-prototype CE
@torch.library.custom_op("mdp::ce_fwd", mutates_args=())
def ce_fwd(feats: Tensor, protos: Tensor, ta: Tensor, tb: Optional[Tensor],
           bias: Optional[Tensor], sw: Optional[Tensor], tau: Tensor, backend: str,
           check_finite: bool, save: str = "none"
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(lse, za, zb, zq, X): what the backward reuses, by ``save``: "basis" X = E from
    ``ce_fwd_basis``, "probs" X = S from ``ce_fwd_probs``, "none" X empty (0,)."""
    if check_finite:
        finite_or_raise(feats, "feats")
        finite_or_raise(protos, "prototypes")
    args = dict(feats=feats, protos=protos, ta=ta, tb=tb, bias=bias, sw=sw, tau=float(tau))
    if save != "none":
        return tuple(dispatch.kernel(f"ce_fwd_{save}", backend)(**args))
    out = tuple(dispatch.kernel("ce_fwd", backend)(**args))
    return out + (feats.new_empty((0,), dtype=out[0].dtype),)


@ce_fwd.register_fake
def _(feats, protos, ta, tb, bias, sw, tau, backend, check_finite, save="none"):
    b, _, p = feats.shape
    acc = acc_dtype(feats.dtype)
    if save == "basis":
        x = torch.empty_like(feats)
    else:
        x = feats.new_empty((b, p, protos.shape[0]) if save == "probs" else (0,), dtype=acc)
    return tuple(feats.new_empty((b, p), dtype=acc) for _ in range(4)) + (x,)


@torch.library.custom_op("mdp::ce_bwd", mutates_args=())
def ce_bwd(g_lse: Tensor, g_za: Tensor, g_zb: Optional[Tensor], g_zq: Optional[Tensor],
           feats: Tensor, protos: Tensor, ta: Tensor, tb: Optional[Tensor],
           bias: Optional[Tensor], sw: Optional[Tensor], lse: Tensor, tau: Tensor,
           need_feats: bool, need_protos: bool, backend: str) -> tuple[Tensor, Tensor]:
    df, dp = dispatch.kernel("ce_bwd", backend)(
        g_lse=g_lse, g_za=g_za, g_zb=g_zb, g_zq=g_zq, feats=feats, protos=protos, ta=ta, tb=tb,
        bias=bias, sw=sw, lse=lse, tau=float(tau), need_feats=need_feats,
        need_protos=need_protos)
    return (df if need_feats else _empty_grad(feats, False),
            dp if need_protos else _empty_grad(protos, False))


@ce_bwd.register_fake
def _(g_lse, g_za, g_zb, g_zq, feats, protos, ta, tb, bias, sw, lse, tau, need_feats,
      need_protos, backend):
    return _empty_grad(feats, need_feats), _empty_grad(protos, need_protos)


@torch.library.custom_op("mdp::ce_bwd_basis", mutates_args=())
def ce_bwd_basis(g_lse: Tensor, g_za: Tensor, g_zb: Optional[Tensor], g_zq: Optional[Tensor],
                 E: Tensor, feats: Tensor, protos: Tensor, ta: Tensor, tb: Optional[Tensor],
                 sw: Optional[Tensor], tau: Tensor, backend: str) -> Tensor:
    return dispatch.kernel("ce_bwd_basis", backend)(
        g_lse=g_lse, g_za=g_za, g_zb=g_zb, g_zq=g_zq, E=E, feats=feats, protos=protos,
        ta=ta, tb=tb, sw=sw, tau=float(tau))


@ce_bwd_basis.register_fake
def _(g_lse, g_za, g_zb, g_zq, E, feats, protos, ta, tb, sw, tau, backend):
    return torch.empty_like(feats)


@torch.library.custom_op("mdp::ce_bwd_probs", mutates_args=())
def ce_bwd_probs(g_lse: Tensor, g_za: Tensor, g_zb: Optional[Tensor], g_zq: Optional[Tensor],
                 S: Tensor, feats: Tensor, protos: Tensor, ta: Tensor, tb: Optional[Tensor],
                 sw: Optional[Tensor], tau: Tensor, need_feats: bool, need_protos: bool,
                 backend: str) -> tuple[Tensor, Tensor]:
    df, dp = dispatch.kernel("ce_bwd_probs", backend)(
        g_lse=g_lse, g_za=g_za, g_zb=g_zb, g_zq=g_zq, S=S, feats=feats, protos=protos,
        ta=ta, tb=tb, sw=sw, tau=float(tau), need_feats=need_feats, need_protos=need_protos)
    return (df if need_feats else _empty_grad(feats, False),
            dp if need_protos else _empty_grad(protos, False))


@ce_bwd_probs.register_fake
def _(g_lse, g_za, g_zb, g_zq, S, feats, protos, ta, tb, sw, tau, need_feats, need_protos,
      backend):
    return _empty_grad(feats, need_feats), _empty_grad(protos, need_protos)


def _ce_setup(ctx, inputs, output):
    feats, protos, ta, tb, bias, sw, tau, backend, _, save = inputs
    ctx.save_for_backward(feats, protos, ta, tb, bias, sw, tau, output[0], output[4])
    ctx.backend, ctx.save = backend, save
    ctx.mark_non_differentiable(output[4])
    ctx.set_materialize_grads(False)  # else the saved tensor would get a zeros gradient


def _ce_backward(ctx, g_lse, g_za, g_zb, g_zq, _):
    feats, protos, ta, tb, bias, sw, tau, lse, saved = ctx.saved_tensors
    need_f, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g_lse, g_za = (torch.zeros_like(lse) if g is None else _grad(g) for g in (g_lse, g_za))
    # an absent target / smoothing term gets no gradient; a present one a zero default
    g_zb = None if tb is None else torch.zeros_like(lse) if g_zb is None else _grad(g_zb)
    g_zq = None if sw is None else torch.zeros_like(lse) if g_zq is None else _grad(g_zq)
    if ctx.save == "probs":  # no logit recompute at all
        df, dp = ce_bwd_probs(g_lse, g_za, g_zb, g_zq, saved, feats, protos, ta, tb, sw, tau,
                              need_feats=need_f, need_protos=need_p, backend=ctx.backend)
        return _input_grads(ce_fwd, feats=df if need_f else None, protos=dp if need_p else None)
    basis_f = need_f and ctx.save == "basis"
    df, dp = None, None
    if basis_f:  # no logit recompute for dF; dP (if needed) still recomputes tiles
        df = ce_bwd_basis(g_lse, g_za, g_zb, g_zq, saved, feats, protos, ta, tb, sw, tau,
                          backend=ctx.backend)
    if (need_f and not basis_f) or need_p:
        df_r, dp = ce_bwd(g_lse, g_za, g_zb, g_zq, feats, protos, ta, tb, bias, sw, lse, tau,
                          need_feats=need_f and not basis_f, need_protos=need_p,
                          backend=ctx.backend)
        df = df if basis_f else df_r
    return _input_grads(ce_fwd, feats=df if need_f else None, protos=dp if need_p else None)


ce_fwd.register_autograd(_once("ce_fwd", _ce_backward), setup_context=_ce_setup)


@torch.library.custom_op("mdp::ce_fwd_grad", mutates_args=())
def ce_fwd_grad(feats: Tensor, protos: Tensor, ta: Tensor, tb: Optional[Tensor],
                bias: Optional[Tensor], sw: Optional[Tensor], tau: Tensor, c_lse: Tensor,
                c_za: Tensor, c_zb: Optional[Tensor], c_zq: Optional[Tensor], backend: str,
                check_finite: bool, need_feats: bool, need_protos: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(lse, za, zb, zq, dfeats, dprotos) of ``ce_fwd_grad``; a gradient not needed is (0,)."""
    if check_finite:
        finite_or_raise(feats, "feats")
        finite_or_raise(protos, "prototypes")
    lse, za, zb, zq, df, dp = dispatch.kernel("ce_fwd_grad", backend)(
        feats=feats, protos=protos, ta=ta, tb=tb, bias=bias, sw=sw, c_lse=c_lse, c_za=c_za,
        c_zb=c_zb, c_zq=c_zq, tau=float(tau), need_feats=need_feats, need_protos=need_protos)
    return (lse, za, zb, zq, df if need_feats else _empty_grad(feats, False),
            dp if need_protos else _empty_grad(protos, False))


@ce_fwd_grad.register_fake
def _(feats, protos, ta, tb, bias, sw, tau, c_lse, c_za, c_zb, c_zq, backend, check_finite,
      need_feats, need_protos):
    b, _, p = feats.shape
    stats = tuple(feats.new_empty((b, p), dtype=acc_dtype(feats.dtype)) for _ in range(4))
    return stats + (torch.empty_like(feats) if need_feats else _empty_grad(feats, False),
                    _empty_grad(protos, need_protos))


@torch.library.custom_op("mdp::scaled_grads", mutates_args=())
def scaled_grads(feats: Tensor, protos: Tensor, dfeats: Tensor, dprotos: Tensor) -> Tensor:
    """A 0-d zero whose backward gives ``feats`` and ``prototypes`` the gradients computed by
    a forward (``ce_fwd_grad``), times the upstream gradient."""
    return dfeats.new_zeros((), dtype=acc_dtype(feats.dtype))


@scaled_grads.register_fake
def _(feats, protos, dfeats, dprotos):
    return dfeats.new_empty((), dtype=acc_dtype(feats.dtype))


def _scaled_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


def _scaled_backward(ctx, g):
    df, dp = ctx.saved_tensors
    need_f, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    df = (df * g).to(df.dtype) if need_f else None
    dp = (dp * g).to(dp.dtype) if need_p else None
    if torch.is_grad_enabled():  # create_graph: mark them so that _once's guard sees them
        df, dp = (None if x is None else x.requires_grad_() for x in (df, dp))
    return _input_grads(scaled_grads, feats=df, protos=dp)


scaled_grads.register_autograd(_once("ce_fwd_grad", _scaled_backward),
                               setup_context=_scaled_setup)


# ---------------------------------------------------------------- consistency CE / KL
@torch.library.custom_op("mdp::con_fwd", mutates_args=())
def con_fwd(student: Tensor, teacher: Tensor, protos: Tensor, bias: Optional[Tensor],
            mask: Optional[Tensor], tau_s: Tensor, tau_t: Tensor, backend: str,
            check_finite: bool, save_basis: bool = False
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(ce, ent, lse_s, lse_t, G): G from ``con_fwd_basis`` when ``save_basis``, else
    empty (0,)."""
    if check_finite:
        finite_or_raise(student, "student")
        finite_or_raise(teacher, "teacher")
        finite_or_raise(protos, "prototypes")
    args = dict(student=student, teacher=teacher, protos=protos, bias=bias, mask=mask,
                tau_s=float(tau_s), tau_t=float(tau_t))
    if save_basis:
        return tuple(dispatch.kernel("con_fwd_basis", backend)(**args))
    ce, ent, lse_s, lse_t = dispatch.kernel("con_fwd", backend)(**args)
    return ce, ent, lse_s, lse_t, student.new_empty((0,), dtype=ce.dtype)


@con_fwd.register_fake
def _(student, teacher, protos, bias, mask, tau_s, tau_t, backend, check_finite,
      save_basis=False):
    b, _, p = student.shape
    acc = acc_dtype(student.dtype)
    g = torch.empty_like(student) if save_basis else student.new_empty((0,), dtype=acc)
    return tuple(student.new_empty((b, p), dtype=acc) for _ in range(4)) + (g,)


@torch.library.custom_op("mdp::con_bwd", mutates_args=())
def con_bwd(g_ce: Tensor, student: Tensor, teacher: Tensor, protos: Tensor,
            bias: Optional[Tensor], mask: Optional[Tensor], lse_s: Tensor, lse_t: Tensor,
            tau_s: Tensor, tau_t: Tensor, need_feats: bool, need_protos: bool, backend: str
            ) -> tuple[Tensor, Tensor]:
    ds, dp = dispatch.kernel("con_bwd", backend)(
        g_ce=g_ce, student=student, teacher=teacher, protos=protos, bias=bias, mask=mask,
        lse_s=lse_s, lse_t=lse_t, tau_s=float(tau_s), tau_t=float(tau_t),
        need_feats=need_feats, need_protos=need_protos)
    return (ds if need_feats else _empty_grad(student, False),
            dp if need_protos else _empty_grad(protos, False))


@con_bwd.register_fake
def _(g_ce, student, teacher, protos, bias, mask, lse_s, lse_t, tau_s, tau_t, need_feats,
      need_protos, backend):
    return _empty_grad(student, need_feats), _empty_grad(protos, need_protos)


@torch.library.custom_op("mdp::con_bwd_basis", mutates_args=())
def con_bwd_basis(g_ce: Tensor, G: Tensor, student: Tensor, backend: str) -> Tensor:
    return dispatch.kernel("con_bwd_basis", backend)(g_ce=g_ce, G=G, student=student)


@con_bwd_basis.register_fake
def _(g_ce, G, student, backend):
    return torch.empty_like(student)


def _con_setup(ctx, inputs, output):
    student, teacher, protos, bias, mask, tau_s, tau_t, backend, _, save_basis = inputs
    ctx.save_for_backward(student, teacher, protos, bias, mask, tau_s, tau_t, output[2],
                          output[3], output[4])
    ctx.backend, ctx.save_basis = backend, save_basis
    ctx.mark_non_differentiable(output[4])
    ctx.set_materialize_grads(False)  # G's grad would be a student-sized zeros tensor


def _con_backward(ctx, g_ce, g_ent, g_lse_s, g_lse_t, _):
    student, teacher, protos, bias, mask, tau_s, tau_t, lse_s, lse_t, basis = ctx.saved_tensors
    need_s, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    g_ce = torch.zeros_like(lse_s) if g_ce is None else _grad(g_ce)
    basis_s = need_s and ctx.save_basis
    ds, dp = None, None
    if basis_s:  # no logit recompute for dS; dP (if needed) still recomputes tiles
        ds = con_bwd_basis(g_ce, basis, student, backend=ctx.backend)
    if (need_s and not basis_s) or need_p:
        ds_r, dp = con_bwd(g_ce, student, teacher, protos, bias, mask, lse_s, lse_t,
                           tau_s, tau_t, need_feats=need_s and not basis_s,
                           need_protos=need_p, backend=ctx.backend)
        ds = ds if basis_s else ds_r
    return _input_grads(con_fwd, student=ds if need_s else None,
                        protos=dp if need_p else None)


con_fwd.register_autograd(_once("con_fwd", _con_backward), setup_context=_con_setup)


# ---------------------------------------------------------------- pixel-to-pixel logsumexp
@torch.library.custom_op("mdp::pix_fwd", mutates_args=())
def pix_fwd(q: Tensor, k: Tensor, qmask: Tensor, kmask: Tensor, tau: Tensor, backend: str,
            check_finite: bool) -> Tensor:
    if check_finite:
        finite_or_raise(q, "feats_q")
        finite_or_raise(k, "feats_k")
    return dispatch.kernel("pix_fwd", backend)(q=q, k=k, qmask=qmask, kmask=kmask,
                                               tau=float(tau))


@pix_fwd.register_fake
def _(q, k, qmask, kmask, tau, backend, check_finite):
    b, _, p = q.shape
    return q.new_empty((b, p), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("mdp::pix_bwd", mutates_args=())
def pix_bwd(g_lse: Tensor, q: Tensor, k: Tensor, qmask: Tensor, kmask: Tensor, lse: Tensor,
            tau: Tensor, need_q: bool, need_k: bool, backend: str) -> tuple[Tensor, Tensor]:
    dq, dk = dispatch.kernel("pix_bwd", backend)(g_lse=g_lse, q=q, k=k, qmask=qmask,
                                                 kmask=kmask, lse=lse, tau=float(tau),
                                                 need_q=need_q, need_k=need_k)
    return (dq if need_q else _empty_grad(q, False), dk if need_k else _empty_grad(k, False))


@pix_bwd.register_fake
def _(g_lse, q, k, qmask, kmask, lse, tau, need_q, need_k, backend):
    return _empty_grad(q, need_q), _empty_grad(k, need_k)


def _pix_setup(ctx, inputs, output):
    q, k, qmask, kmask, tau, backend, _ = inputs
    ctx.save_for_backward(q, k, qmask, kmask, tau, output)
    ctx.backend = backend


def _pix_backward(ctx, g_lse):
    q, k, qmask, kmask, tau, lse = ctx.saved_tensors
    need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dq, dk = pix_bwd(_grad(g_lse), q, k, qmask, kmask, lse, tau, need_q=need_q,
                     need_k=need_k, backend=ctx.backend)
    return _input_grads(pix_fwd, q=dq if need_q else None, k=dk if need_k else None)


pix_fwd.register_autograd(_once("pix_fwd", _pix_backward), setup_context=_pix_setup)


# ---------------------------------------------------------------- feature normalisation
NORM_EPS = 1e-12  # F.normalize's


@torch.library.custom_op("mdp::normalize_fwd", mutates_args=())
def normalize_fwd(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(y, norm): ``F.normalize(x, dim=1)`` of a (B, D, P) view and the per-pixel norms."""
    return tuple(dispatch.kernel("normalize_fwd", backend)(x=x, eps=NORM_EPS))


@normalize_fwd.register_fake
def _(x, backend):
    return torch.empty_like(x), x.new_empty((x.shape[0], x.shape[2]), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("mdp::normalize_bwd", mutates_args=())
def normalize_bwd(grad: Tensor, y: Tensor, norm: Tensor, backend: str) -> Tensor:
    return dispatch.kernel("normalize_bwd", backend)(grad=grad, y=y, norm=norm, eps=NORM_EPS)


@normalize_bwd.register_fake
def _(grad, y, norm, backend):
    return torch.empty_like(y)


def _normalize_setup(ctx, inputs, output):
    ctx.save_for_backward(*output)
    ctx.mark_non_differentiable(output[1])  # the norms are a by-product for the backward
    ctx.backend = inputs[1]


def _normalize_backward(ctx, g_y, _):
    y, norm = ctx.saved_tensors
    return _input_grads(normalize_fwd, x=normalize_bwd(g_y, y, norm, backend=ctx.backend))


normalize_fwd.register_autograd(_once("normalize_fwd", _normalize_backward),
                                setup_context=_normalize_setup)


# ---------------------------------------------------------------- pseudo-labels, bank
@torch.library.custom_op("mdp::pseudo_label", mutates_args=())
def pseudo_label(feats: Tensor, protos: Tensor, bias: Optional[Tensor], threshold: float,
                 ignore_index: int, backend: str) -> tuple[Tensor, Tensor]:
    return dispatch.kernel("pseudo_label", backend)(feats=feats, protos=protos, bias=bias,
                                                    threshold=threshold,
                                                    ignore_index=ignore_index)


@pseudo_label.register_fake
def _(feats, protos, bias, threshold, ignore_index, backend):
    b, _, p = feats.shape
    return (feats.new_empty((b, p), dtype=torch.int64),
            feats.new_empty((b, p), dtype=torch.float32))


@torch.library.custom_op("mdp::bank_slot", mutates_args=())
def bank_slot(sums: Tensor, counts: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return dispatch.kernel("bank_slot", backend)(sums=sums, counts=counts)


@bank_slot.register_fake
def _(sums, counts, backend):
    _, c, d = sums.shape
    return sums.new_empty((c, d)), sums.new_empty((c,))


@torch.library.custom_op("mdp::bank_prototypes", mutates_args=())
def bank_prototypes(sums: Tensor, counts: Tensor, normalize: bool, backend: str
                    ) -> tuple[Tensor, Tensor]:
    return dispatch.kernel("bank_prototypes", backend)(sums=sums, counts=counts,
                                                       normalize=normalize)


@bank_prototypes.register_fake
def _(sums, counts, normalize, backend):
    _, c, d = sums.shape
    return sums.new_empty((c, d)), sums.new_empty((c,), dtype=torch.bool)
