"""Every loss runs inside torch.compile(fullgraph=True) and matches eager mode."""
import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import make_case, unit

BACKENDS = ["auto", "reference"]


def compiled(fn, compiler="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=compiler)


def check(fn, *inputs):
    """fn compiled with fullgraph=True gives the eager loss and gradients."""
    grads_in = [x for x in inputs if torch.is_tensor(x) and x.requires_grad]
    eager = fn(*inputs)
    g_eager = torch.autograd.grad(eager, grads_in)
    comp = compiled(fn)(*inputs)
    g_comp = torch.autograd.grad(comp, grads_in)
    torch.testing.assert_close(comp, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prototype_contrast_loss(backend):
    f, p, y = make_case(2, 16, 19, (5, 6))
    yb = torch.randint(0, 19, y.shape)
    lam = torch.tensor([0.3, 0.9])
    cm = torch.rand(19) > 0.2
    f.requires_grad_()
    p.requires_grad_()
    check(lambda f, p: mk.prototype_contrast_loss(f, p, y, class_mask=cm, labels_b=yb, lam=lam,
                                                  backend=backend), f, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_consistency_pixel_pool_pseudo(backend):
    f, p, y = make_case(2, 16, 7, (4, 5))
    g = unit(f + 0.2 * torch.randn_like(f))
    f.requires_grad_()
    check(lambda f: mk.prototype_consistency_loss(f, g, p, kind="kl", backend=backend), f)
    check(lambda f: mk.pixel_contrast_loss(f, y, g, y, num_classes=7, backend=backend), f)
    check(lambda f: mk.masked_average_pool(f, y, 7, backend=backend)[0].square().sum(), f)
    fn = lambda f: mk.pseudo_label(f, p, threshold=0.1, backend=backend)
    for a, b in zip(compiled(fn)(f), fn(f)):
        torch.testing.assert_close(a, b)


def test_module_compiles_with_inductor():
    f, _, y = make_case(2, 16, 7, (4, 5))
    s = unit(torch.randn_like(f))
    eager_mod = mk.PrototypeContrastLoss(7, 16, bank_images=4, batch_size=2)
    comp_mod = mk.PrototypeContrastLoss(7, 16, bank_images=4, batch_size=2)
    step = compiled(lambda m, f: m(f, y, con_student=f, con_teacher=s), "inductor")
    for _ in range(2):  # the second call reads a bank that the first call wrote
        torch.testing.assert_close(step(comp_mod, f), eager_mod(f, y, con_student=f,
                                                                con_teacher=s))
    torch.testing.assert_close(comp_mod.bank.slot_sums, eager_mod.bank.slot_sums)
    assert int(comp_mod.bank.ptr) == 0


@pytest.mark.parametrize("op", ["pool", "ce"])
def test_label_check_runs_inside_compiled_graph(op):
    """The fused path checks label values inside its custom op, so compiled graphs raise."""
    if op == "ce":
        require("cpu", ("ce_fwd", "ce_bwd"))
    f, p, y = make_case(2, 8, 5, (3, 3))
    y[0, 1, 1] = 9
    fn = compiled(lambda f: mk.prototype_contrast_loss(f, p, y) if op == "ce"
                  else mk.masked_average_pool(f, y, 5)[0])
    with pytest.raises(ValueError, match="label value 9"):
        fn(f)
