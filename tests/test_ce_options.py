"""prototype_contrast_loss's F.cross_entropy options (``weight``, ``label_smoothing``) on every
backend: against ``F.cross_entropy`` on the tau-scaled logits, loss and both gradients."""
import pytest
import torch
import torch.nn.functional as F

import mdp_kernels as mk
from conftest import require
from helpers import IGNORE, F64_TOL, PATH_TOL, TOL, loss_and_grads, make_case, rel_err

BACKENDS = ["reference", "cpu", "triton"]
TAU = 0.2


def dev(backend):
    return torch.device("cpu") if backend == "reference" else require(backend, ("ce_fwd", "ce_bwd"))


def torch_ce(f, p, y, **kw):
    """The idiomatic formulation: F.cross_entropy on einsum logits."""
    return F.cross_entropy(torch.einsum("bdhw,cd->bchw", f, p) / TAU, y, ignore_index=IGNORE,
                           **kw)


def ours(f, p, y, backend, **kw):
    return mk.prototype_contrast_loss(f, p, y, tau=TAU, backend=backend, **kw)


def compare(backend, dtype, c=19, tol=None, **kw):
    d = dev(backend)
    f, p, y = make_case(2, 16, c, (5, 7), dtype=torch.float64, seed=c)
    w = kw.pop("weight", None)
    got = loss_and_grads(lambda f, p: ours(f, p, y.to(d), backend, weight=None if w is None
                                           else w.to(d, dtype), **kw),
                         f.to(d, dtype), p.to(d, dtype))
    ref = loss_and_grads(lambda f, p: torch_ce(f, p, y, weight=w, **kw), f, p)
    tol = tol or (F64_TOL if dtype == torch.float64 else TOL)
    for name, a, b in zip(("loss", "dfeats", "dprotos"), got, ref):
        assert rel_err(a.cpu(), b) <= tol, f"{name}: {rel_err(a.cpu(), b):.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", ["weight", "smoothing", "both"])
def test_matches_f_cross_entropy(backend, dtype, reduction, opts):
    kw = dict(reduction=reduction)
    if opts in ("weight", "both"):
        kw["weight"] = torch.rand(19, dtype=torch.float64) + 0.1
    if opts in ("smoothing", "both"):
        kw["label_smoothing"] = 0.15
    compare(backend, dtype, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixing_uses_each_targets_weight_and_normaliser(backend):
    d = dev(backend)
    f, p, y = make_case(2, 16, 19, (5, 7), dtype=torch.float64, seed=3)
    yb = torch.randint(0, 19, y.shape)
    yb[0, 0] = IGNORE
    w = torch.rand(19, dtype=torch.float64) + 0.1
    got = ours(f.to(d), p.to(d), y.to(d), backend, labels_b=yb.to(d), lam=0.3,
               weight=w.to(d), label_smoothing=0.1)
    expect = (0.3 * torch_ce(f, p, y, weight=w, label_smoothing=0.1)
              + 0.7 * torch_ce(f, p, yb, weight=w, label_smoothing=0.1))
    assert rel_err(got.cpu(), expect) <= F64_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_smoothing_spreads_over_allowed_classes(backend):
    """With a class mask the problem is the CE over the allowed classes alone."""
    d = dev(backend)
    f, p, y = make_case(2, 16, 19, (5, 7), dtype=torch.float64, seed=4)
    allowed = torch.rand(19, generator=torch.Generator().manual_seed(0)) > 0.3
    w = torch.rand(19, dtype=torch.float64) + 0.1
    got = loss_and_grads(lambda f: ours(f, p.to(d), y.to(d), backend, class_mask=allowed.to(d),
                                        weight=w.to(d), label_smoothing=0.2), f.to(d))
    remap = torch.full((19,), IGNORE, dtype=torch.int64)
    remap[allowed] = torch.arange(int(allowed.sum()))
    ys = torch.where(y == IGNORE, IGNORE, remap[y.clamp(min=0)])
    ref = loss_and_grads(lambda f: torch_ce(f, p[allowed], ys, weight=w[allowed],
                                            label_smoothing=0.2), f)
    for a, b in zip(got, ref):
        assert rel_err(a.cpu(), b) <= F64_TOL


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck_float64(backend):
    d = dev(backend)
    f, p, y = make_case(1, 6, 5, (2, 3), dtype=torch.float64, device=d)
    w = torch.rand(5, dtype=torch.float64, device=d) + 0.1
    fn = lambda f, p: ours(f, p, y, backend, weight=w, label_smoothing=0.3)
    assert torch.autograd.gradcheck(fn, (f.clone().requires_grad_(), p.clone().requires_grad_()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weights_give_zero_not_nan(backend):
    d = dev(backend)
    f, p, y = make_case(2, 8, 5, (3, 3), device=d)
    f.requires_grad_()
    for smoothing in (0.0, 0.4):
        loss = ours(f, p, y, backend, weight=torch.zeros(5, device=d), label_smoothing=smoothing)
        g, = torch.autograd.grad(loss, f)
        assert loss == 0 and torch.isfinite(g).all() and not g.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_options(backend):
    d = dev(backend)
    f, p, y = make_case(1, 4, 5, (2, 2), device=d)
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
        ours(f, p, y, backend, weight=torch.ones(4, device=d))
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        ours(f, p, y, backend, weight=torch.ones(5, dtype=torch.int64, device=d))
    with pytest.raises(ValueError, match=r"weight must lie in \[0, inf\)"):
        ours(f, p, y, backend, weight=torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0], device=d))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\]"):
            ours(f, p, y, backend, label_smoothing=bad)
    with pytest.raises(TypeError, match="label_smoothing must be a real number"):
        ours(f, p, y, backend, label_smoothing="0.1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_options_under_compile_and_export(backend):
    """The weight check runs inside compiled graphs and exported programs, and the options
    and a per-image class mask give the eager numbers there."""
    d = dev(backend)
    f, p, y = make_case(2, 8, 5, (3, 3), device=d)
    cm = torch.ones(2, 5, dtype=torch.bool, device=d)
    cm[1, :2] = False

    class Loss(torch.nn.Module):
        def forward(self, f, w):
            return mk.prototype_contrast_loss(f, p, y, weight=w, label_smoothing=0.1,
                                              class_mask=cm, backend=backend)

    w = torch.rand(5, device=d) + 0.1
    eager = Loss()(f, w)
    torch._dynamo.reset()
    for run in (torch.compile(Loss(), fullgraph=True, backend="aot_eager"),
                torch.export.export(Loss(), (f, w)).module()):
        torch.testing.assert_close(run(f, w), eager)
        with pytest.raises(ValueError, match=r"weight must lie in \[0, inf\)"):
            run(f, -w)


def _feature_sized_saves(fn, f):
    """How many tensors of ``f``'s size the autograd graph of ``fn(f)`` keeps."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t,
                                                  lambda t: t):
        loss = fn(f)
    loss.backward()
    return sum(n == f.numel() for n in sizes)


@pytest.mark.parametrize("op", ["ce", "con"])
def test_memory_low_keeps_nothing_feature_sized(op):
    """memory="low": the same numbers as the default, without the cpu backend's saved basis."""
    d = dev("cpu")
    f, p, y = make_case(2, 16, 150, (5, 7), device=d)
    t = torch.randn_like(f)
    def fn(memory):
        if op == "ce":
            return lambda f: ours(f, p, y, "cpu", memory=memory)
        return lambda f: mk.prototype_consistency_loss(f, t, p, memory=memory, backend="cpu")
    runs = {}
    for memory in ("auto", "low"):
        leaf = f.clone().requires_grad_()
        runs[memory] = _feature_sized_saves(fn(memory), leaf), leaf.grad
    inputs = 1 if op == "ce" else 2  # the features (and the teacher's), then the basis
    assert runs["auto"][0] == inputs + 1 and runs["low"][0] == inputs
    assert rel_err(runs["low"][1], runs["auto"][1]) <= PATH_TOL
    with pytest.raises(ValueError, match="memory must be 'auto' or 'low'"):
        fn("small")(f)
