"""prototype_contrast_loss: every kernel backend against the float64 reference."""
import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import IGNORE, TOL, check_low_precision, loss_and_grads, make_case, rel_err

OPS = ("ce_fwd", "ce_bwd")


def ce(f, p, y, backend, **kw):
    return loss_and_grads(lambda f, p: mk.prototype_contrast_loss(f, p, y, backend=backend,
                                                                  **kw), f, p)


def compare(f, p, y, backend, device, tol=TOL, **kw):
    got = ce(f.to(device), p.to(device), y.to(device), backend,
                         **{k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()})
    ref = ce(f.double(), p.double(), y, "reference",
                         **{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                            for k, v in kw.items()})
    for name, a, b in zip(("loss", "dfeats", "dprotos"), got, ref):
        assert a.dtype == (torch.float64 if f.dtype == torch.float64 else a.dtype)
        assert rel_err(a.cpu(), b) <= tol, f"{name}: rel err {rel_err(a.cpu(), b):.3g}"
    return got


@pytest.mark.parametrize("c,hw", [(1, (3, 5)), (19, (7, 9)), (150, (5, 11)), (171, (4, 13)),
                                  (1000, (3, 7))])
def test_matches_reference(backend, c, hw):
    device = require(backend, OPS)
    f, p, y = make_case(2, 24, c, hw, dtype=torch.float32)
    compare(f, p, y, backend, device, tau=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_class_mask(backend, reduction):
    device = require(backend, OPS)
    f, p, y = make_case(2, 16, 19, (6, 7))
    cm = torch.rand(19) > 0.3
    cm[y[0, 0, 0] % 19] = False  # a masked target class is ignored for that target
    compare(f, p, y, backend, device, class_mask=cm, reduction=reduction)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mixing(backend, per_image, reduction):
    device = require(backend, OPS)
    f, p, y = make_case(3, 16, 23, (5, 6))
    yb = torch.randint(0, 23, y.shape)
    yb[1, :2] = IGNORE
    lam = torch.tensor([0.1, 0.5, 0.9]) if per_image else 0.35
    compare(f, p, y, backend, device, labels_b=yb, lam=lam, reduction=reduction)


def test_flat_and_strided_inputs(backend):
    device = require(backend, OPS)
    f, p, y = make_case(2, 16, 19, (5, 9))
    flat_f = f.permute(0, 2, 3, 1).reshape(-1, 16)  # (N, D), pixel-major
    compare(flat_f, p, y.reshape(-1), backend, device)
    compare(f.contiguous(memory_format=torch.channels_last), p, y, backend, device)


def test_all_ignored_is_zero_with_zero_grads(backend):
    device = require(backend, OPS)
    f, p, y = make_case(2, 8, 5, (3, 3))
    y[:] = IGNORE
    loss, gf, gp = ce(f.to(device), p.to(device), y.to(device), backend)
    assert float(loss) == 0.0
    assert not gf.any() and not gp.any()
    cm = torch.zeros(5, dtype=torch.bool, device=device)  # every class masked out
    f2, p2, y2 = make_case(2, 8, 5, (3, 3))
    loss, gf, gp = ce(f2.to(device), p2.to(device), y2.to(device), backend,
                                  class_mask=cm)
    assert float(loss) == 0.0 and not gf.any() and not gp.any()


def test_gradcheck_float64(backend):
    device = require(backend, OPS)
    f, p, y = make_case(2, 6, 7, (2, 3), dtype=torch.float64, device=device)
    yb = torch.randint(0, 7, y.shape, device=device)
    cm = torch.tensor([True, True, False, True, True, True, True], device=device)
    lam = torch.tensor([0.3, 0.8], dtype=torch.float64, device=device)
    f.requires_grad_()
    p.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f, p: mk.prototype_contrast_loss(f, p, y, tau=0.5, class_mask=cm, labels_b=yb,
                                                lam=lam, backend=backend), (f, p))


def test_detached_prototypes_get_no_grad(backend):
    device = require(backend, OPS)
    f, p, y = make_case(2, 8, 5, (4, 4), device=device)
    f.requires_grad_()
    mk.prototype_contrast_loss(f, p, y, backend=backend).backward()
    assert f.grad is not None and p.grad is None


def test_deterministic(backend):
    device = require(backend, OPS)
    f, p, y = make_case(2, 32, 57, (9, 11))
    a = ce(f.to(device), p.to(device), y.to(device), backend)
    b = ce(f.to(device), p.to(device), y.to(device), backend)
    for x, z in zip(a, b):
        assert torch.equal(x, z)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    device = require(backend, OPS)
    f, p, y = make_case(2, 32, 171, (6, 7))
    got = ce(f.to(dtype).to(device), p.to(dtype).to(device), y.to(device), backend)
    eager = ce(f.to(dtype), p.to(dtype), y, "reference")
    truth = ce(f.to(dtype).double(), p.to(dtype).double(), y, "reference")
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for name, a, e, t in zip(("loss", "dfeats", "dprotos"), got, eager, truth):
        check_low_precision(a.cpu(), e, t, dtype, name)
