"""The cpu backend's low-precision path (bf16/fp16 products in the input dtype, fp32
statistics): every save policy, reduction, prototype gradient and retain_graph, against the
float64 reference by the tolerance rule (fused error <= 2x the eager low-precision error)."""
import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import IGNORE, check_low_precision, loss_and_grads, make_case

LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _cpu():
    require("cpu", ("ce_fwd", "ce_bwd", "con_fwd", "con_bwd"))


def ce_loss(backend, y, yb, reduction):
    return lambda f, p: mk.prototype_contrast_loss(
        f, p, y, tau=0.1, labels_b=yb, lam=torch.tensor([0.3, 0.7]), reduction=reduction,
        backend=backend)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("save", ["none", "basis", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("c", [19, 150])
def test_ce_matches_float64_by_the_rule(dtype, save, reduction, c):
    f, p, y = make_case(2, 64, c, (9, 13), dtype=torch.float64, seed=c)
    yb = y.flip(0)
    truth = loss_and_grads(ce_loss("reference", y, yb, reduction), f, p)
    eager = loss_and_grads(ce_loss("reference", y, yb, reduction), f.to(dtype), p.to(dtype))
    with mk.config.override(save=save):
        fused = loss_and_grads(ce_loss("cpu", y, yb, reduction), f.to(dtype), p.to(dtype))
    for name, a, b, t in zip(("loss", "dfeats", "dprotos"), fused, eager, truth):
        assert a.dtype == (torch.float32 if name == "loss" else dtype)
        check_low_precision(a, b, t, dtype, f"{save} {name}")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("basis", [False, True])
def test_consistency_matches_float64_by_the_rule(dtype, basis):
    s, p, _ = make_case(2, 64, 150, (9, 13), dtype=torch.float64, seed=1)
    t, _, _ = make_case(2, 64, 150, (9, 13), dtype=torch.float64, seed=2)

    def loss(backend, t):
        return lambda s, p: mk.prototype_consistency_loss(s, t, p, kind="kl", reduction="none",
                                                          backend=backend)
    truth = loss_and_grads(loss("reference", t), s, p)
    eager = loss_and_grads(loss("reference", t.to(dtype)), s.to(dtype), p.to(dtype))
    with mk.config.override(save="basis" if basis else "none"):
        fused = loss_and_grads(loss("cpu", t.to(dtype)), s.to(dtype), p.to(dtype))
    for name, a, b, tr in zip(("loss", "dstudent", "dprotos"), fused, eager, truth):
        check_low_precision(a, b, tr, dtype, name)


@pytest.mark.parametrize("save", ["none", "basis", "probs"])
def test_retain_graph_second_backward_is_identical(save):
    f, p, y = make_case(2, 64, 150 if save == "basis" else 19, (9, 13), dtype=torch.bfloat16)
    f.requires_grad_(), p.requires_grad_()
    with mk.config.override(save=save):
        loss = mk.prototype_contrast_loss(f, p, y, tau=0.1, reduction="sum", backend="cpu")
    first = torch.autograd.grad(loss, (f, p), retain_graph=True)
    second = torch.autograd.grad(loss, (f, p))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_saved_bases_are_in_the_input_dtype():
    """bf16 products are bf16: E and G are kept at half the memory of fp32 ones."""
    f, p, y = make_case(1, 32, 150, (4, 8), dtype=torch.bfloat16)
    ta = torch.where(y == IGNORE, -1, y).flatten(1)
    e = torch.ops.mdp_ext.ce_fwd_basis(f.flatten(2), p, ta, None, None, None, 0.1)[4]
    assert e.dtype == torch.bfloat16 and e.shape == f.flatten(2).shape
    g = torch.ops.mdp_ext.con_fwd_basis(f.flatten(2), f.flatten(2), p, None, None, 0.1, 0.04)[4]
    assert g.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_pixel_matches_float64_by_the_rule(dtype, reduction):
    q, _, yq = make_case(2, 64, 7, (9, 13), dtype=torch.float64, seed=3)
    k, _, yk = make_case(2, 64, 7, (8, 11), dtype=torch.float64, seed=4)

    def loss(backend):
        return lambda q, k: mk.pixel_contrast_loss(q, yq, k, yk, tau=0.1, num_classes=7,
                                                   reduction=reduction, backend=backend)
    truth = loss_and_grads(loss("reference"), q, k)
    eager = loss_and_grads(loss("reference"), q.to(dtype), k.to(dtype))
    fused = loss_and_grads(loss("cpu"), q.to(dtype), k.to(dtype))
    for name, a, b, t in zip(("loss", "dq", "dk"), fused, eager, truth):
        check_low_precision(a, b, t, dtype, name)
