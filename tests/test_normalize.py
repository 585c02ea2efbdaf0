"""``normalize=True`` on the losses: against ``F.normalize`` then the op (and the float64
reference), loss and gradients, zero- and tiny-norm pixels, every layout; the
normalize_fwd / normalize_bwd kernels on their own, gradcheck, low precision, compile."""
import pytest
import torch
import torch.nn.functional as F

import mdp_kernels as mk
from conftest import require
from helpers import F64_TOL, TOL, check_low_precision, loss_and_grads, make_case, rel_err

BACKENDS = ["reference", "cpu", "triton", "cuda"]


def dev(backend, ops):
    return torch.device("cpu") if backend == "reference" else require(backend, ops)


def raw(f: torch.Tensor) -> torch.Tensor:
    """Unnormalised features with a zero pixel and one below F.normalize's eps."""
    g = torch.Generator().manual_seed(f.numel())
    x = f * (0.5 + 3 * torch.rand(f.shape[0], 1, *f.shape[2:], generator=g, dtype=f.dtype))
    x[0, :, 0, 0] = 0
    x[-1, :, -1, -1] *= 1e-14
    return x


def ce(normalize, backend, p, y):
    def fn(f, P):
        f = f if normalize else F.normalize(f, dim=1)
        return mk.prototype_contrast_loss(f, P, y, tau=0.1, labels_b=y.flip(0), lam=0.3,
                                          normalize=normalize, backend=backend)
    return fn


def con(normalize, backend, teacher):
    def fn(s, P):
        s, t = (s, teacher) if normalize else (F.normalize(s, dim=1), F.normalize(teacher, dim=1))
        return mk.prototype_consistency_loss(s, t, P, kind="kl", reduction="none",
                                             normalize=normalize, backend=backend)
    return fn


def pix(normalize, backend, y, yk):
    def fn(q, k):
        if not normalize:
            q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        return mk.pixel_contrast_loss(q, y, k, yk, tau=0.2, num_classes=6,
                                      normalize=normalize, backend=backend)
    return fn


PHASES = {"ce": ("ce_fwd", "ce_bwd"), "con": ("con_fwd", "con_bwd"),
          "pix": ("pix_fwd", "pix_bwd", "class_sums", "class_sums_bwd")}


def case(op, d=torch.device("cpu"), dtype=torch.float64):
    """(loss(normalize, backend), its two differentiable inputs) of ``op``, on ``d``."""
    f, p, y = make_case(2, 12, 6, (5, 7), dtype=torch.float64, seed=3)
    x = raw(f)
    if op == "ce":
        return lambda n, b: ce(n, b, None, y.to(d)), (x, p)
    if op == "con":
        t = raw(torch.randn(f.shape, generator=torch.Generator().manual_seed(7),
                            dtype=torch.float64)).to(d, dtype)
        return lambda n, b: con(n, b, t), (x, p)
    k, _, yk = make_case(2, 12, 6, (4, 6), dtype=torch.float64, seed=4)
    return lambda n, b: pix(n, b, y.to(d), yk.to(d)), (x, raw(k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["ce", "con", "pix"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_f_normalize_then_the_op(backend, op, dtype):
    d = dev(backend, PHASES[op])
    make, inputs = case(op, d, dtype)
    got = loss_and_grads(make(True, backend), *(t.to(d, dtype) for t in inputs))
    make_ref, inputs = case(op)
    ref = loss_and_grads(make_ref(False, "reference"), *inputs)
    tol = F64_TOL if dtype == torch.float64 else TOL
    for name, a, b in zip(("loss", "grad 0", "grad 1"), got, ref):
        assert rel_err(a.cpu(), b) <= tol, f"{op} {name}: {rel_err(a.cpu(), b):.3g}"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("layout", ["bdhw", "channels_last", "nd", "strided"])
def test_kernels_match_f_normalize(backend, layout):
    """normalize_fwd / normalize_bwd directly: every layout, zero and tiny norms."""
    d = require(backend, ("normalize_fwd", "normalize_bwd"))
    fwd = mk.dispatch.kernel("normalize_fwd", backend)
    bwd = mk.dispatch.kernel("normalize_bwd", backend)
    x = raw(torch.randn(3, 20, 9, 11, dtype=torch.float64))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "nd":
        x = x[0].flatten(1).t()  # (N, D)
    elif layout == "strided":
        x = x[:, ::2, :, 1:]
    x = x.to(d)
    v = mk.layout.as_bdp(x)
    y, norm = fwd(x=v, eps=1e-12)
    truth = F.normalize(v, dim=1)
    assert torch.equal(y == 0, truth == 0) and rel_err(y, truth) <= 1e-14
    assert rel_err(norm, v.norm(dim=1)) <= 1e-14
    g = torch.randn_like(v)
    leaf = v.detach().clone().requires_grad_()
    want, = torch.autograd.grad(F.normalize(leaf, dim=1), leaf, g)
    assert rel_err(bwd(grad=g, y=y, norm=norm, eps=1e-12), want) <= 1e-12


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck_float64(backend):
    d = require(backend, ("ce_fwd", "ce_bwd", "normalize_fwd", "normalize_bwd"))
    f, p, y = make_case(1, 5, 4, (2, 3), dtype=torch.float64, device=d, normalize=False)
    fn = lambda f, p: mk.prototype_contrast_loss(f, p, y, tau=0.5, normalize=True,
                                                 backend=backend)
    assert torch.autograd.gradcheck(fn, (f.clone().requires_grad_(), p.clone().requires_grad_()))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    """Fused error <= 2x the eager low-precision error (F.normalize then the reference, in
    ``dtype``), both against float64."""
    d = require(backend, ("ce_fwd", "ce_bwd", "normalize_fwd", "normalize_bwd"))
    f, p, y = make_case(2, 32, 19, (6, 6), dtype=torch.float64, seed=5, normalize=False)
    fn = lambda be, n: (lambda f, P: mk.prototype_contrast_loss(
        f if n else F.normalize(f, dim=1), P, y.to(f.device), tau=0.1, normalize=n, backend=be))
    truth = loss_and_grads(fn("reference", False), f, p)
    eager = loss_and_grads(fn("reference", False), f.to(dtype), p.to(dtype))
    fused = loss_and_grads(fn(backend, True), f.to(d, dtype), p.to(d, dtype))
    for name, a, b, t in zip(("loss", "dfeats", "dprotos"), fused, eager, truth):
        assert a.dtype == (torch.float32 if name == "loss" else dtype)
        check_low_precision(a.cpu(), b, t, dtype, name)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_under_compile_and_export(backend):
    d = dev(backend, PHASES["ce"])
    f, p, y = make_case(2, 8, 5, (3, 3), device=d, normalize=False)

    class Loss(torch.nn.Module):
        def forward(self, f):
            return mk.prototype_contrast_loss(f, p, y, normalize=True, backend=backend)

    leaf = f.clone().requires_grad_()
    eager = Loss()(leaf)
    g_eager, = torch.autograd.grad(eager, leaf)
    torch._dynamo.reset()
    compiled = torch.compile(Loss(), fullgraph=True, backend="aot_eager")
    out = compiled(leaf)
    g, = torch.autograd.grad(out, leaf)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g, g_eager)
    torch.testing.assert_close(torch.export.export(Loss(), (f,)).module()(f), eager.detach())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_transforms_raise_naming_the_op(backend):
    d = require(backend, ("ce_fwd", "ce_bwd", "normalize_fwd", "normalize_bwd"))
    f, p, y = make_case(1, 4, 3, (2, 2), device=d, normalize=False)
    fn = lambda f: mk.prototype_contrast_loss(f, p, y, normalize=True, backend=backend)
    with pytest.raises(RuntimeError, match="prototype_contrast_loss.*torch.func.jvp"):
        torch.func.jvp(fn, (f,), (torch.ones_like(f),))
    leaf = f.clone().requires_grad_()
    g, = torch.autograd.grad(fn(leaf), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        g.sum().backward()
