"""pixel_contrast_loss: kernel backends against the float64 reference (Eq. 1 written out)."""
import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import IGNORE, TOL, check_low_precision, loss_and_grads, make_case, rel_err

OPS = ("pix_fwd", "pix_bwd")


def run(q, yq, k, yk, backend, **kw):
    return loss_and_grads(lambda q, k: mk.pixel_contrast_loss(q, yq, k, yk, backend=backend,
                                                              **kw), q, k)


def views(b, d, c, hw_q, hw_k, dtype=torch.float32):
    q, _, yq = make_case(b, d, c, hw_q, dtype=dtype)
    k, _, yk = make_case(b, d, c, hw_k, dtype=dtype)
    return q, yq, k, yk


@pytest.mark.parametrize("hw_q,hw_k", [((5, 7), (5, 7)), ((9, 13), (6, 11)), ((1, 3), (17, 9))])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference(backend, hw_q, hw_k, reduction):
    device = require(backend, OPS)
    q, yq, k, yk = views(2, 24, 6, hw_q, hw_k)
    yk[1] = torch.where(yk[1] == 3, IGNORE, yk[1])  # class 3 absent from one key view
    got = run(q.to(device), yq.to(device), k.to(device), yk.to(device), backend,
              num_classes=6, reduction=reduction)
    ref = run(q.double(), yq, k.double(), yk, "reference", reduction=reduction)
    for name, a, b in zip(("loss", "dq", "dk"), got, ref):
        assert rel_err(a.cpu(), b) <= TOL, name


def test_all_ignored_and_gradcheck(backend):
    device = require(backend, OPS)
    q, yq, k, yk = (x.to(device) for x in views(2, 5, 3, (2, 3), (3, 2), dtype=torch.float64))
    loss, gq, gk = run(q, yq, k, torch.full_like(yk, IGNORE), backend, num_classes=3)
    assert float(loss) == 0.0 and not gq.any() and not gk.any()
    q.requires_grad_()
    k.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k: mk.pixel_contrast_loss(q, yq, k, yk, tau=0.5, backend=backend), (q, k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    device = require(backend, OPS)
    q, yq, k, yk = views(2, 32, 5, (8, 8), (8, 8), dtype=dtype)
    got = run(q.to(device), yq.to(device), k.to(device), yk.to(device), backend)
    eager = run(q, yq, k, yk, "reference")
    truth = run(q.double(), yq, k.double(), yk, "reference")
    for name, a, e, t in zip(("loss", "dq", "dk"), got, eager, truth):
        check_low_precision(a.cpu(), e, t, dtype, name)
