"""prototype_consistency_loss: kernel backends against the float64 reference."""
import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import TOL, check_low_precision, loss_and_grads, make_case, rel_err, unit

OPS = ("con_fwd", "con_bwd")


def case(b, d, c, hw, dtype=torch.float32):
    f, p, _ = make_case(b, d, c, hw, dtype=torch.float64)
    g = unit(f + 0.5 * torch.randn_like(f))
    return f.to(dtype), g.to(dtype), p.to(dtype)


def run(s, t, p, backend, **kw):
    return loss_and_grads(lambda s, p: mk.prototype_consistency_loss(s, t, p, backend=backend,
                                                                     **kw), s, p)


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("c,hw", [(1, (3, 5)), (19, (7, 9)), (171, (4, 13)), (1000, (3, 7))])
def test_matches_reference(backend, kind, c, hw):
    device = require(backend, OPS)
    s, t, p = case(2, 24, c, hw)
    got = run(s.to(device), t.to(device), p.to(device), backend, kind=kind)
    ref = run(s.double(), t.double(), p.double(), "reference", kind=kind)
    for name, a, b in zip(("loss", "dstudent", "dprotos"), got, ref):
        assert rel_err(a.cpu(), b) <= TOL, name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mask_class_mask_reductions(backend, reduction):
    device = require(backend, OPS)
    s, t, p = case(2, 16, 19, (5, 6))
    mask = torch.rand(2, 5, 6) > 0.4
    cm = torch.rand(19) > 0.3
    kw = dict(mask=mask, class_mask=cm, reduction=reduction, kind="kl")
    got = run(s.to(device), t.to(device), p.to(device), backend,
              **{k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()})
    ref = run(s.double(), t.double(), p.double(), "reference", **kw)
    for a, b in zip(got, ref):
        assert rel_err(a.cpu(), b) <= TOL


def test_empty_mask_and_no_class_is_zero(backend):
    device = require(backend, OPS)
    s, t, p = (x.to(device) for x in case(2, 8, 5, (3, 3)))
    loss, gs, gp = run(s, t, p, backend, mask=torch.zeros(2, 3, 3, dtype=torch.bool, device=device))
    assert float(loss) == 0.0 and not gs.any() and not gp.any()
    loss, gs, gp = run(s, t, p, backend, class_mask=torch.zeros(5, dtype=torch.bool, device=device))
    assert float(loss) == 0.0 and not gs.any() and not gp.any()


def test_gradcheck_float64_and_no_teacher_grad(backend):
    device = require(backend, OPS)
    s, t, p = (x.to(device) for x in case(2, 5, 6, (2, 3), dtype=torch.float64))
    s.requires_grad_()
    t.requires_grad_()
    # Not w.r.t. prototypes: a finite difference in P also moves the teacher softmax, which
    # the loss treats as a constant (stop-gradient); dprotos is checked in test_matches_reference.
    assert torch.autograd.gradcheck(
        lambda s: mk.prototype_consistency_loss(s, t, p, kind="kl", backend=backend), (s,))
    p.requires_grad_()
    mk.prototype_consistency_loss(s, t, p, backend=backend).backward()
    assert t.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    device = require(backend, OPS)
    s, t, p = case(2, 32, 171, (6, 7), dtype=dtype)
    got = run(s.to(device), t.to(device), p.to(device), backend)
    eager = run(s, t, p, "reference")
    truth = run(s.double(), t.double(), p.double(), "reference")
    for name, a, e, tr in zip(("loss", "dstudent", "dprotos"), got, eager, truth):
        check_low_precision(a.cpu(), e, tr, dtype, name)
