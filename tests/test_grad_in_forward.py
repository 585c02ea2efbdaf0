"""The cpu backend's gradient-in-forward path (``ce_fwd_grad``): a reduced CE loss whose
prototypes take a gradient gets dF and dP from the forward's logit tiles. Against the float64
reference with every option, upstream gradients other than 1, retain_graph, a learnable
temperature and mixing weight, and the cases that must keep the other paths."""
import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import F64_TOL, TOL, loss_and_grads, make_case, rel_err


@pytest.fixture(autouse=True)
def _cpu():
    require("cpu", ("ce_fwd", "ce_bwd", "ce_fwd_grad"))


@pytest.fixture
def calls(monkeypatch):
    """The CE forward kernels that ran, in order."""
    seen = []
    for op in ("ce_fwd", "ce_fwd_basis", "ce_fwd_probs", "ce_fwd_grad"):
        fn = mk.dispatch.kernel(op, "cpu")
        monkeypatch.setitem(mk.dispatch._kernels["cpu"], op,
                            lambda fn=fn, op=op, **kw: seen.append(op) or fn(**kw))
    return seen


def case(c=150, b=2, seed=0):
    f, p, y = make_case(b, 24, c, (5, 7), dtype=torch.float64, seed=seed)
    cm = torch.rand(b, c, generator=torch.Generator().manual_seed(seed)) > 0.3
    return f, p, y, cm


def loss(backend, y, cm, reduction, **kw):
    return lambda f, p: mk.prototype_contrast_loss(
        f, p, y, tau=0.1, labels_b=y.flip(0), lam=torch.tensor([0.3, 0.8]), class_mask=cm,
        weight=torch.linspace(0.5, 1.5, p.shape[0], dtype=torch.float64).to(f.dtype),
        label_smoothing=0.2, reduction=reduction, backend=backend, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("c", [19, 150])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_with_every_option(calls, reduction, c, dtype):
    f, p, y, cm = case(c)
    got = loss_and_grads(loss("cpu", y, cm, reduction), f.to(dtype), p.to(dtype))
    assert calls == ["ce_fwd_grad"]
    ref = loss_and_grads(loss("reference", y, cm, reduction), f, p)
    tol = F64_TOL if dtype == torch.float64 else TOL
    for name, a, b in zip(("loss", "dfeats", "dprotos"), got, ref):
        assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.3g}"


def test_upstream_gradient_retain_graph_and_double_backward(calls):
    f, p, y, cm = case()
    f, p = f.requires_grad_(), p.requires_grad_()
    out = loss("cpu", y, cm, "mean")(f, p)
    first = torch.autograd.grad(3 * out, (f, p), retain_graph=True)
    second = torch.autograd.grad(-0.5 * out, (f, p), retain_graph=True)
    for a, b in zip(first, second):
        assert torch.allclose(a * (-0.5 / 3), b, rtol=1e-12, atol=0)
    ref = loss_and_grads(loss("reference", y, cm, "mean"), f, p)
    assert rel_err(first[0] / 3, ref[1]) <= F64_TOL and rel_err(first[1] / 3, ref[2]) <= F64_TOL
    g, = torch.autograd.grad(out, f, create_graph=True)
    with pytest.raises(RuntimeError, match="ce_fwd_grad is differentiable once"):
        g.sum().backward()


def test_learnable_temperature_and_mixing_weight(calls):
    f, p, y, _ = case()
    def run(backend):
        tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        lam = torch.tensor([0.3, 0.8], dtype=torch.float64, requires_grad=True)
        fr, pr = f.clone().requires_grad_(), p.clone().requires_grad_()
        out = mk.prototype_contrast_loss(fr, pr, y, tau=tau, labels_b=y.flip(0), lam=lam,
                                         backend=backend)
        return torch.autograd.grad(out, (fr, pr, tau, lam))
    got, ref = run("cpu"), run("reference")
    assert calls == ["ce_fwd_grad"]
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= F64_TOL


@pytest.mark.parametrize("setting", ["none", "no_protos_grad", "memory_low", "probs", "compile"])
def test_other_paths_where_it_does_not_apply(calls, setting):
    f, p, y, _ = case(c=5 if setting == "probs" else 150)
    f.requires_grad_(), p.requires_grad_(setting != "no_protos_grad")
    kw = dict(reduction="none") if setting == "none" else {}
    kw.update(memory="low") if setting == "memory_low" else None
    fn = lambda f, p: mk.prototype_contrast_loss(f, p, y, backend="cpu", **kw).sum()
    if setting == "compile":
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    fn(f, p).backward()
    assert "ce_fwd_grad" not in calls and calls
