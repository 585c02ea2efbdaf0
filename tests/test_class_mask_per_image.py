"""Per-image ``(B, C)`` class masks: image b's softmax over its own allowed classes, on every
backend, against a loop over images of the ``(C,)`` op."""
import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import F64_TOL, IGNORE, loss_and_grads, make_case, rel_err, unit

BACKENDS = ["reference", "cpu", "triton"]


def dev(backend, ops):
    return torch.device("cpu") if backend == "reference" else require(backend, ops)


def masks(b, c, seed=0):
    m = torch.rand(b, c, generator=torch.Generator().manual_seed(seed)) > 0.4
    m[0, :2] = True
    m[-1] = False  # an image with no allowed class
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", [False, True])
def test_ce_matches_per_image_loop(backend, mix):
    d = dev(backend, ("ce_fwd", "ce_bwd"))
    f, p, y = make_case(3, 16, 19, (4, 5), dtype=torch.float64, seed=1)
    yb = torch.randint(0, 19, y.shape)
    cm = masks(3, 19)
    lam = torch.tensor([0.2, 0.6, 0.9], dtype=torch.float64)
    kw = lambda i: dict(labels_b=yb[i:i + 1].to(d), lam=lam[i:i + 1].to(d)) if mix else {}
    got = loss_and_grads(lambda f, p: mk.prototype_contrast_loss(
        f, p, y.to(d), class_mask=cm.to(d), reduction="sum", label_smoothing=0.1,
        backend=backend, **(dict(labels_b=yb.to(d), lam=lam.to(d)) if mix else {})),
        f.to(d), p.to(d))
    ref = loss_and_grads(lambda f, p: sum(mk.prototype_contrast_loss(
        f[i:i + 1], p, y[i:i + 1].to(d), class_mask=cm[i].to(d), reduction="sum",
        label_smoothing=0.1, backend="reference", **kw(i)) for i in range(3)),
        f.to(d), p.to(d))
    for a, b in zip(got, ref):
        assert rel_err(a.cpu(), b.cpu()) <= F64_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_consistency_matches_per_image_loop(backend):
    d = dev(backend, ("con_fwd", "con_bwd"))
    f, p, _ = make_case(3, 16, 19, (4, 5), dtype=torch.float64, seed=2)
    t = unit(f + 0.4 * torch.randn_like(f))
    cm = masks(3, 19, seed=1)
    got = loss_and_grads(lambda s, p: mk.prototype_consistency_loss(
        s, t.to(d), p, class_mask=cm.to(d), kind="kl", reduction="sum", backend=backend),
        f.to(d), p.to(d))
    ref = loss_and_grads(lambda s, p: sum(mk.prototype_consistency_loss(
        s[i:i + 1], t[i:i + 1].to(d), p, class_mask=cm[i].to(d), kind="kl", reduction="sum",
        backend="reference") for i in range(3)), f.to(d), p.to(d))
    for a, b in zip(got, ref):
        assert rel_err(a.cpu(), b.cpu()) <= F64_TOL
    mean = mk.prototype_consistency_loss(f.to(d), t.to(d), p.to(d), class_mask=cm.to(d),
                                         kind="kl", backend=backend)
    assert rel_err(mean.cpu(), got[0] / (2 * 20)) <= F64_TOL  # the empty image does not count


@pytest.mark.parametrize("backend", BACKENDS)
def test_pseudo_label_matches_per_image_loop(backend):
    d = dev(backend, ("pseudo_label",))
    f, p, _ = make_case(3, 16, 19, (4, 5), seed=3)
    cm = masks(3, 19, seed=2)
    labels, scores = mk.pseudo_label(f.to(d), p.to(d), threshold=0.0, class_mask=cm.to(d),
                                     backend=backend)
    for i in range(3):
        li, si = mk.pseudo_label(f[i:i + 1], p, threshold=0.0, class_mask=cm[i],
                                 backend="reference")
        assert torch.equal(labels[i:i + 1].cpu(), li)
        torch.testing.assert_close(scores[i:i + 1].cpu(), si)
    assert (labels[-1] == IGNORE).all() and torch.isinf(scores[-1]).all()


def test_bad_mask_shapes():
    f, p, y = make_case(2, 8, 5, (3, 3))
    for bad in (torch.ones(3, 5, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool),
                torch.ones(2, 5, 1, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"class_mask must have shape \(5,\) or \(2, 5\)"):
            mk.prototype_contrast_loss(f, p, y, class_mask=bad)
    with pytest.raises(TypeError, match="class_mask must be a bool tensor"):
        mk.pseudo_label(f, p, class_mask=torch.ones(2, 5))
