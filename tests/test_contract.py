"""The library's contract: no silent wrong result on any path (eager, compiled, exported,
every backend, autograd transforms, meta tensors, autocast), and a failed call changes no
state. One section per defect that once broke it."""
import os

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import mdp_kernels as mk
from conftest import device_for, expected_backends, require
from helpers import IGNORE, check_low_precision, make_case, rel_err, unit
from mdp_kernels import dispatch

LOSS_OPS = dispatch.LOSS_OPS
FUSED = ["cpu", "triton"]
ALL = ["reference"] + FUSED


def dev(backend):
    return torch.device("cpu") if backend == "reference" else require(backend, LOSS_OPS)


def compiled(fn, compiler="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=compiler)


# ---------------------------------------------------------------- 1. ignore_index vs classes
@pytest.mark.parametrize("backend", ALL)
def test_ignore_index_that_is_a_class_raises(backend):
    d = dev(backend)
    f, p, y = make_case(1, 8, 342, (2, 3), device=d)
    msg = r"ignore_index=255 is one of the 342 classes .*ignore_index=-1"
    with pytest.raises(ValueError, match=msg):
        mk.prototype_contrast_loss(f, p, y, ignore_index=255, backend=backend)
    with pytest.raises(ValueError, match=msg):
        mk.class_embedding_sums(f, y, 342, ignore_index=255, backend=backend)
    with pytest.raises(ValueError, match=msg):
        mk.masked_average_pool(f, y, 342, ignore_index=255, backend=backend)
    with pytest.raises(ValueError, match=msg):
        mk.pseudo_label(f, p, ignore_index=255, backend=backend)
    with pytest.raises(ValueError, match=msg):
        mk.pixel_contrast_loss(f, y, f, y, num_classes=342, ignore_index=255, backend=backend)
    with pytest.raises(ValueError, match=msg):
        mk.PrototypeBank(342, 8, 2, ignore_index=255, backend=backend)
    with pytest.raises(ValueError, match=msg):
        mk.PrototypeContrastLoss(342, 8, ignore_index=255, backend=backend)
    # inferred class count: label 7 makes 8 classes, of which 3 is one
    yk = torch.full_like(y, 7)
    with pytest.raises(ValueError, match="ignore_index=3 is one of the 8 classes"):
        mk.pixel_contrast_loss(f, yk, f, yk, ignore_index=3, backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_class_255_is_a_class_with_the_default(backend):
    d = dev(backend)
    f, p, _ = make_case(2, 8, 342, (2, 3), device=d)
    y = torch.full((2, 2, 3), 255, device=d)
    y[1, 0] = IGNORE
    bank = mk.PrototypeBank(342, 8, 2, backend=backend)
    bank.update(f, y)
    assert bank.prototypes()[1].nonzero().flatten().tolist() == [255]
    f255 = p[255].view(1, 8, 1, 1).expand(1, 8, 2, 2).contiguous()
    labels, _ = mk.pseudo_label(f255, p, threshold=0.5, backend=backend)
    assert (labels == 255).all()
    loss = mk.prototype_contrast_loss(f, p, y, backend=backend)
    assert loss > 0


# ---------------------------------------------------------------- 2. failed calls change no state
def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("backend", ALL)
def test_failed_module_call_leaves_state_bit_identical(backend):
    d = dev(backend)
    f, _, y = make_case(2, 8, 5, (3, 4), device=d, seed=1)
    t = unit(torch.randn_like(f))
    crit = mk.PrototypeContrastLoss(5, 8, bank_images=4, batch_size=2, backend=backend)
    twin = mk.PrototypeContrastLoss(5, 8, bank_images=4, batch_size=2, backend=backend)
    for m in (crit, twin):
        m(f, y, con_student=f, con_teacher=t)
    before = _state(crit)
    nan = f.clone()
    nan[0, 0, 0, 0] = float("nan")
    bad_y = y.clone()
    bad_y[0, 0, 0] = 9
    bad_calls = [
        (dict(feats=nan, labels=y), "^feats contains NaN"),  # key view defaults to feats
        (dict(feats=f, labels=y, key_feats=nan), "^key_feats contains NaN"),
        (dict(feats=f, labels=bad_y, key_feats=f, key_labels=y), "label value 9"),
        (dict(feats=f, labels=y, labels_b=y, lam=torch.tensor([0.5, 1.5], device=d)),
         r"lam must lie in \[0, 1\]"),
        (dict(feats=f, labels=y, con_student=f, con_teacher=nan), "teacher contains NaN"),
        (dict(feats=f, labels=y, con_student=f, con_teacher=t[:, :, :2]), "same"),
    ]
    for kw, msg in bad_calls:
        with pytest.raises(ValueError, match=msg):
            crit(**kw)
        assert _same(_state(crit), before), msg
    # and training goes on exactly as if the bad calls never happened
    torch.testing.assert_close(crit(f, y), twin(f, y), rtol=0, atol=0)
    assert _same(_state(crit), _state(twin))


def test_failed_compiled_module_call_leaves_state_bit_identical():
    f, _, y = make_case(2, 8, 5, (3, 4), seed=2)
    crit = mk.PrototypeContrastLoss(5, 8, bank_images=4, batch_size=2)
    step = compiled(lambda m, f, y: m(f, y), "inductor")
    step(crit, f, y)
    before = _state(crit)
    nan = f.clone()
    nan[1, 2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="^feats contains NaN"):
        step(crit, nan, y)
    assert _same(_state(crit), before)


def test_bank_update_refuses_non_finite_key_features():
    f, _, y = make_case(2, 4, 3, (2, 2))
    bank = mk.PrototypeBank(3, 4, 2)
    bank.update(f, y)
    before = _state(bank)
    f[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="key_feats contains NaN"):
        bank.update(f, y)
    assert _same(_state(bank), before)
    bank.update(f, y, check_finite=False)  # opted out: stored as given
    assert int(bank.num_updates) == 2


# ---------------------------------------------------------------- 3. checks inside graphs
@pytest.mark.parametrize("backend", ALL)
def test_value_checks_run_compiled_and_exported(backend):
    d = dev(backend)
    f, p, y = make_case(2, 8, 5, (3, 3), device=d)
    lam = torch.tensor([0.2, 0.7], device=d)

    class Loss(torch.nn.Module):
        def forward(self, f, p, y, lam, tau):
            return mk.prototype_contrast_loss(f, p, y, labels_b=y, lam=lam, tau=tau,
                                              backend=backend)

    tau = torch.tensor(0.1)
    good = (f, p, y, lam, tau)
    exported = torch.export.export(Loss(), good).module()
    runners = {"eager": Loss(), "compiled": compiled(Loss()), "exported": exported}
    bad_y = y.clone()
    bad_y[1, 1, 1] = 77
    nan = f.clone()
    nan[0, 3, 0, 0] = float("nan")
    cases = [((f, p, bad_y, lam, tau), "label value 77"),
             ((nan, p, y, lam, tau), "feats contains NaN"),
             ((f, p, y, torch.tensor([0.2, 1.1], device=d), tau), r"lam must lie in \[0, 1\]"),
             ((f, p, y, lam, torch.tensor(-0.1)), r"tau must lie in \(0, inf\)")]
    expect = Loss()(*good)
    for how, run in runners.items():
        torch.testing.assert_close(run(*good), expect)
        for args, msg in cases:
            with pytest.raises(ValueError, match=msg):
                run(*args)


@pytest.mark.parametrize("backend", ALL)
def test_reference_and_fused_checks_under_compile_other_ops(backend):
    d = dev(backend)
    f, p, y = make_case(2, 8, 5, (3, 3), device=d)
    nan = f.clone()
    nan[0, 0, 1, 1] = float("nan")
    bad = y.clone()
    bad[0, 0, 0] = 5
    con = compiled(lambda s: mk.prototype_consistency_loss(s, f, p, backend=backend))
    with pytest.raises(ValueError, match="student contains NaN"):
        con(nan)
    pix = compiled(lambda y: mk.pixel_contrast_loss(f, y, f, y, num_classes=5,
                                                    backend=backend))
    with pytest.raises(ValueError, match="label value 5"):
        pix(bad)
    pool = compiled(lambda y: mk.masked_average_pool(f, y, 5, backend=backend)[0])
    with pytest.raises(ValueError, match="label value 5"):
        pool(bad)


# ---------------------------------------------------------------- 4. autograd transforms
def _ops(backend, f, p, y):
    """Every differentiable op of ``f`` (prototypes and the key view ``g`` fixed), by name."""
    g = unit(f.detach() + 0.3)
    return {
        "ce": lambda f: mk.prototype_contrast_loss(f, p, y, tau=0.3, backend=backend),
        "con": lambda f: mk.prototype_consistency_loss(f, g, p, backend=backend),
        "pix": lambda f: mk.pixel_contrast_loss(f, y, g, y, num_classes=p.shape[0],
                                                backend=backend),
        "sums": lambda f: mk.class_embedding_sums(f, y, p.shape[0],
                                                  backend=backend)[0].square().sum(),
    }


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_refuse_forward_ad_and_func_grad(backend):
    d = dev(backend)
    f, p, y = make_case(1, 4, 3, (2, 2), dtype=torch.float64, device=d)
    for name, fn in _ops(backend, f, p, y).items():
        with pytest.raises(RuntimeError, match=r"torch.func.jvp.*backend='reference'"):
            torch.func.jvp(fn, (f,), (torch.ones_like(f),))
        with pytest.raises(RuntimeError, match=r"torch.func.grad.*backend='reference'"):
            torch.func.grad(fn)(f)
        with pytest.raises(RuntimeError, match=r"torch.func.grad.*backend='reference'"):
            torch.func.jacrev(fn)(f)
        with fwAD.dual_level():
            with pytest.raises(RuntimeError, match=r"forward-mode AD.*backend='reference'"):
                fn(fwAD.make_dual(f, torch.ones_like(f)))


def test_reference_supports_every_transform():
    f, p, y = make_case(1, 4, 3, (2, 3), dtype=torch.float64)
    v = torch.randn_like(f)
    for name, fn in _ops("reference", f, p, y).items():
        ff = f.clone().requires_grad_()
        g, = torch.autograd.grad(fn(ff), ff)
        torch.testing.assert_close(torch.func.grad(fn)(f), g, msg=name)
        _, tangent = torch.func.jvp(fn, (f,), (v,))
        torch.testing.assert_close(tangent, (g * v).sum(), msg=name)
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(f, v))
            torch.testing.assert_close(fwAD.unpack_dual(out).tangent, (g * v).sum(), msg=name)


@pytest.mark.parametrize("backend", ALL)
def test_vmap_matches_a_loop(backend):
    d = dev(backend)
    f, p, y = make_case(1, 4, 3, (2, 3), dtype=torch.float64, device=d)
    fs = unit(torch.randn(3, *f.shape, dtype=torch.float64, device=d), dim=2)
    for name, fn in _ops(backend, f, p, y).items():
        torch.testing.assert_close(torch.func.vmap(fn)(fs), torch.stack([fn(x) for x in fs]),
                                   msg=name)


@pytest.mark.parametrize("backend", ALL)
def test_double_backward(backend):
    """A gradient penalty, for every op and the fused normalisation: exact on the reference
    (gradgradcheck; CE also against F.cross_entropy at tau = 1), a clear error naming the
    op on the fused backends."""
    d = dev(backend)
    f, p, y = make_case(1, 4, 3, (2, 3), dtype=torch.float64, device=d)
    fns = _ops(backend, f, p, y)
    fns["normalize"] = lambda f: mk.prototype_contrast_loss(2 * f, p, y, normalize=True,
                                                            backend=backend)
    kernel = {"ce": "ce_fwd", "con": "con_fwd", "pix": "pix_fwd", "sums": "class_sums",
              "normalize": "normalize_fwd"}
    for name, fn in fns.items():
        ff = f.clone().requires_grad_()
        g, = torch.autograd.grad(fn(ff), ff, create_graph=True)
        if backend != "reference":
            with pytest.raises(RuntimeError, match=rf"mdp::{kernel[name]} is differentiable once"):
                torch.autograd.grad(g.square().sum(), ff)
        else:
            assert torch.autograd.gradgradcheck(fn, (ff,)), name
    if backend != "reference":
        return
    f, p, y = make_case(2, 6, 5, (2, 3), dtype=torch.float64)
    f.requires_grad_()
    g, = torch.autograd.grad(mk.prototype_contrast_loss(f, p, y, tau=1.0, backend=backend), f,
                             create_graph=True)
    h, = torch.autograd.grad(g.square().sum(), f)
    logits = torch.einsum("bdhw,cd->bchw", f, p)
    g2, = torch.autograd.grad(F.cross_entropy(logits, y, ignore_index=IGNORE), f,
                              create_graph=True)
    h2, = torch.autograd.grad(g2.square().sum(), f)
    torch.testing.assert_close(h, h2)


# ---------------------------------------------------------------- 5. meta and fake tensors
@pytest.mark.parametrize("backend", ALL + ["auto"])
def test_meta_and_fake_tensors_give_shapes(backend):
    if backend in FUSED:
        dev(backend)
    f = torch.empty(2, 8, 3, 5, device="meta", requires_grad=True)
    p = torch.empty(7, 8, device="meta")
    y = torch.empty(2, 3, 5, dtype=torch.int64, device="meta")
    loss = mk.prototype_contrast_loss(f, p, y, labels_b=y, lam=torch.rand(2, device="meta"),
                                      backend=backend)
    assert loss.shape == () and loss.device.type == "meta"
    loss.backward()
    assert f.grad.shape == f.shape
    none = mk.prototype_consistency_loss(f, f, p, reduction="none", backend=backend)
    assert none.shape == (2, 3, 5)
    assert mk.pixel_contrast_loss(f, y, f, y, num_classes=7, backend=backend).shape == ()
    sums, counts = mk.class_embedding_sums(f, y, 7, backend=backend)
    assert sums.shape == (2, 7, 8) and counts.shape == (2, 7)
    labels, scores = mk.pseudo_label(f, p, backend=backend)
    assert labels.shape == scores.shape == (2, 3, 5)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        ff, pp = torch.randn(2, 8, 3, 5), torch.randn(7, 8)
        yy = torch.randint(0, 7, (2, 3, 5))
        assert mk.prototype_contrast_loss(ff, pp, yy, backend=backend).shape == ()


# ---------------------------------------------------------------- 6. temperature
@pytest.mark.parametrize("backend", ALL)
def test_tau_accepts_numbers_numpy_and_tensors(backend):
    d = dev(backend)
    f, p, y = make_case(2, 8, 5, (3, 3), device=d)
    ref = mk.prototype_contrast_loss(f, p, y, tau=0.25, backend=backend)
    for tau in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25),
                torch.tensor(0.25, dtype=torch.float64, device=d)):
        torch.testing.assert_close(mk.prototype_contrast_loss(f, p, y, tau=tau, backend=backend),
                                   ref)
    for bad, err in ((True, TypeError), ("0.1", TypeError), (torch.ones(1), TypeError),
                     (0.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError)):
        with pytest.raises(err, match="tau"):
            mk.prototype_contrast_loss(f, p, y, tau=bad, backend=backend)


def _tau_grads(backend, d, op, protos_grad, feats_grad):
    f, p, y = make_case(2, 8, 5, (3, 4), dtype=torch.float64, seed=4)
    g = unit(f + 0.3 * torch.randn_like(f))
    out = []
    for be, dv in ((backend, d), ("reference", "cpu")):
        ff = f.to(dv).requires_grad_(feats_grad)
        pp = p.to(dv).requires_grad_(protos_grad)
        tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        if op == "ce":
            loss = mk.prototype_contrast_loss(ff, pp, y.to(dv), tau=tau, backend=be)
        elif op == "con":
            loss = mk.prototype_consistency_loss(ff, g.to(dv), pp, tau_student=tau, backend=be)
        else:
            loss = mk.pixel_contrast_loss(ff, y.to(dv), g.to(dv), y.to(dv), tau=tau,
                                          num_classes=5, backend=be)
        wrt = [tau] + [t for t in (ff, pp) if t.requires_grad]
        out.append([loss.detach()] + list(torch.autograd.grad(loss, wrt)))
    return out


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", ["ce", "con", "pix"])
@pytest.mark.parametrize("protos_grad,feats_grad", [(False, True), (True, True),
                                                    (True, False), (False, False)])
def test_learnable_temperature_gradient(backend, op, protos_grad, feats_grad):
    if op == "pix" and protos_grad:
        pytest.skip("the pixel loss has no prototypes")
    d = dev(backend)
    got, ref = _tau_grads(backend, d, op, protos_grad, feats_grad)
    for a, b in zip(got, ref):
        assert rel_err(a.cpu(), b) < 1e-9


def test_learnable_temperature_gradcheck():
    f, p, y = make_case(1, 4, 3, (2, 3), dtype=torch.float64)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: mk.prototype_contrast_loss(f, p, y, tau=t,
                                                                  backend="cpu"), (tau,))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("op", ["ce", "con", "pix"])
def test_new_tau_is_not_a_recompile(backend, op):
    d = dev(backend)
    f, p, y = make_case(2, 8, 5, (3, 3), device=d)
    g = unit(f + 0.3)
    call = {"ce": lambda f, tau: mk.prototype_contrast_loss(f, p, y, tau=tau, backend=backend),
            "con": lambda f, tau: mk.prototype_consistency_loss(f, g, p, tau_student=tau,
                                                                backend=backend),
            "pix": lambda f, tau: mk.pixel_contrast_loss(f, y, g, y, tau=tau, num_classes=5,
                                                         backend=backend)}[op]
    fn = compiled(call)
    for tau in (0.1, 0.15):  # dynamo compiles a second, dynamic graph for a new float
        fn(f, tau)           # (automatic dynamic, as for ints); none after that
    fn(f, torch.tensor(0.1))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tau in (0.05, 0.2, 0.3, 0.7):
            torch.testing.assert_close(fn(f, tau), call(f, tau))
            torch.testing.assert_close(fn(f, torch.tensor(tau)), call(f, tau))


# ---------------------------------------------------------------- 7. autocast
@pytest.mark.parametrize("backend", ALL)
def test_autocast_casts_like_linear(backend):
    d = dev(backend)
    f, p, y = make_case(2, 16, 7, (3, 4), dtype=torch.bfloat16, device=d)
    proto = torch.nn.Parameter(p.float())
    with pytest.raises(TypeError, match="prototypes is torch.float32"):
        mk.prototype_contrast_loss(f, proto, y, backend=backend)
    with pytest.raises(TypeError, match="float32"):
        mk.pixel_contrast_loss(f, y, f.float(), y, num_classes=7, backend=backend)

    def calls(be):  # every op with mixed bf16 / fp32 inputs, under autocast on d
        with torch.autocast(d.type, dtype=torch.bfloat16):
            return dict(
                ce=mk.prototype_contrast_loss(f, proto, y, backend=be),
                ce32=mk.prototype_contrast_loss(f.float(), proto, y, backend=be),
                con=mk.prototype_consistency_loss(f, f.float(), proto, backend=be),
                pix=mk.pixel_contrast_loss(f, y, f.float(), y, num_classes=7, backend=be),
                lab=mk.pseudo_label(f, proto, threshold=0.0, backend=be)[0])

    got = calls(backend)
    got["ce"].backward()  # bf16 features, fp32 Parameter: its gradient is fp32
    assert proto.grad is not None and proto.grad.dtype == torch.float32
    # as the same ops on bf16 inputs (the cast of proto is exactly p)
    plain = dict(ce=mk.prototype_contrast_loss(f, p, y, backend=backend),
                 con=mk.prototype_consistency_loss(f, f, p, backend=backend),
                 pix=mk.pixel_contrast_loss(f, y, f, y, num_classes=7, backend=backend))
    plain["ce32"] = plain["ce"]
    for k, v in plain.items():
        torch.testing.assert_close(got[k].detach(), v, msg=k)
    assert torch.equal(got["lab"], mk.pseudo_label(f, p, threshold=0.0, backend=backend)[0])
    if backend != "reference":  # fused and reference under autocast, against float64
        ref = calls("reference")
        f64, p64 = f.double(), p.double()
        truth = dict(ce=mk.prototype_contrast_loss(f64, p64, y, backend="reference"),
                     con=mk.prototype_consistency_loss(f64, f64, p64, backend="reference"),
                     pix=mk.pixel_contrast_loss(f64, y, f64, y, num_classes=7,
                                                backend="reference"))
        truth["ce32"] = truth["ce"]
        for k, t in truth.items():
            check_low_precision(got[k].detach(), ref[k].detach(), t, torch.bfloat16, k)


# ---------------------------------------------------------------- 8. promised shapes, backends
@pytest.mark.parametrize("backend", ALL)
def test_pixel_loss_with_n_queries_and_m_keys(backend):
    d = dev(backend)
    q = unit(torch.randn(11, 8, dtype=torch.float64), 1)
    k = unit(torch.randn(17, 8, dtype=torch.float64), 1)
    yq, yk = torch.randint(0, 3, (11,)), torch.randint(0, 3, (17,))
    yq[0] = IGNORE
    got = mk.pixel_contrast_loss(q.to(d), yq.to(d), k.to(d), yk.to(d), tau=0.2, num_classes=3,
                                 backend=backend)
    terms = []
    for i in range(11):
        pos = yk == yq[i]
        if yq[i] == IGNORE or not pos.any():
            continue
        z = k @ q[i] / 0.2
        terms.append(torch.logsumexp(z, 0) - z[pos].mean())
    torch.testing.assert_close(got.cpu(), torch.stack(terms).mean())


def test_triton_module_and_bank_run_end_to_end():
    d = dev("triton")
    f, _, y = make_case(2, 8, 5, (3, 3), device=d)
    t = unit(torch.randn_like(f))
    out = []
    for be in ("triton", "reference"):
        crit = mk.PrototypeContrastLoss(5, 8, bank_images=4, batch_size=2, backend=be)
        ff = f.clone().requires_grad_()
        loss = crit(ff, y, con_student=ff, con_teacher=t)
        loss.backward()
        out.append((loss.detach(), ff.grad, crit.bank.slot_sums.clone()))
    for a, b in zip(*out):
        assert rel_err(a, b) < 1e-5


def test_constructors_reject_backends_that_cannot_run():
    if "cuda" in expected_backends():
        pytest.skip("this machine runs the cuda backend")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        mk.PrototypeBank(3, 4, 2, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        mk.PrototypeContrastLoss(3, 4, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.PrototypeContrastLoss(3, 4, backend="gpu")


# ---------------------------------------------------------------- 9. early, uniform validation
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", [None, 2.0, True, "255"])
def test_ignore_index_must_be_an_int(backend, bad):
    d = dev(backend)
    f, p, y = make_case(1, 4, 3, (2, 2), device=d)
    calls = [lambda: mk.prototype_contrast_loss(f, p, y, ignore_index=bad, backend=backend),
             lambda: mk.class_embedding_sums(f, y, 3, ignore_index=bad, backend=backend),
             lambda: mk.pseudo_label(f, p, ignore_index=bad, backend=backend),
             lambda: mk.pixel_contrast_loss(f, y, f, y, num_classes=3, ignore_index=bad,
                                            backend=backend)]
    for call in calls:
        with pytest.raises(TypeError, match=f"ignore_index must be an int, got {bad!r}"):
            call()


@pytest.mark.parametrize("backend", ALL)
def test_threshold_must_be_finite_real(backend):
    d = dev(backend)
    f, p, _ = make_case(1, 4, 3, (2, 2), device=d)
    for bad, err in ((float("nan"), ValueError), (float("inf"), ValueError),
                     ("0.5", TypeError), (None, TypeError), (torch.tensor(0.5), TypeError)):
        with pytest.raises(err, match="threshold"):
            mk.pseudo_label(f, p, threshold=bad, backend=backend)


def test_constructors_validate_at_construction():
    for kw, err, msg in [(dict(tau=0.0), ValueError, "tau"), (dict(tau="a"), TypeError, "tau"),
                         (dict(tau_teacher=-1.0), ValueError, "tau_teacher"),
                         (dict(tau=torch.tensor(-1.0)), ValueError, r"tau must lie in \(0"),
                         (dict(tau_student=torch.tensor(0.0)), ValueError, "tau_student"),
                         (dict(tau_teacher=torch.tensor(float("nan"))), ValueError,
                          "tau_teacher must lie"),
                         (dict(tau=torch.nn.Parameter(torch.tensor(float("inf")))), ValueError,
                          r"tau must lie in \(0, inf\), got inf"),
                         (dict(tau=torch.ones(1)), TypeError, "tau"),
                         (dict(ignore_index=2.0), TypeError, "ignore_index"),
                         (dict(alpha=float("nan")), ValueError, "alpha"),
                         (dict(bank_images=True), ValueError, "bank_images")]:
        with pytest.raises(err, match=msg):
            mk.PrototypeContrastLoss(5, 4, **kw)
    for kw, err, msg in [(dict(dtype=torch.int64), TypeError, "dtype"),
                         (dict(dtype="float32"), TypeError, "dtype"),
                         (dict(ignore_index=None), TypeError, "ignore_index")]:
        with pytest.raises(err, match=msg):
            mk.PrototypeBank(5, 4, 2, **kw)
    with pytest.raises(ValueError, match="num_slots"):
        mk.PrototypeBank(5, 4, True)
    crit = mk.PrototypeContrastLoss(5, 4, tau=torch.nn.Parameter(torch.tensor(0.1)))
    assert [n for n, _ in crit.named_parameters()] == ["tau"]  # a valid one is kept


# ---------------------------------------------------------------- 10. complete backends
def _why_incomplete(name):
    """Why backend ``name`` cannot run every loss on its test device, or None."""
    d = device_for(name)
    try:
        dispatch.resolve(LOSS_OPS, name, d)
    except RuntimeError as exc:
        return f"{exc} (on {d})"
    if name not in mk.available_backends(d):
        return f"available_backends({d!s}) does not list it"
    return None


def test_expected_backends_are_complete():
    """A broken build fails here rather than turning every kernel test into a skip."""
    for name in expected_backends() - {"cuda"}:  # cuda has a subset of phases by design
        assert _why_incomplete(name) is None, f"{name}: {_why_incomplete(name)}"
    assert mk.available_backends()[0] == "reference"


def test_backend_missing_a_phase_drops_out(monkeypatch):
    """A backend that loaded but lacks one loss phase is not listed, fails the kernel tests
    (``require``) and the completeness check, and ``auto`` does not pick it for that op."""
    require("cpu", LOSS_OPS)
    monkeypatch.setenv("MDP_EXPECT_BACKENDS", "cpu")
    partial = {op: fn for op, fn in dispatch._kernels["cpu"].items() if op != "pix_bwd"}
    monkeypatch.setitem(dispatch._kernels, "cpu", partial)
    assert "cpu" not in mk.available_backends("cpu")
    assert "pix_bwd" in _why_incomplete("cpu")
    with pytest.raises(pytest.fail.Exception, match="expected backend 'cpu' cannot run"):
        require("cpu", LOSS_OPS)
    with pytest.raises(RuntimeError, match="no kernel for pix_bwd"):
        mk.PrototypeContrastLoss(3, 4, backend="cpu")
    assert dispatch.resolve(("pix_fwd", "pix_bwd"), "auto", torch.device("cpu")) == "reference"
    assert dispatch.resolve(("ce_fwd", "ce_bwd"), "auto", torch.device("cpu")) == "cpu"


def test_broken_build_fails_instead_of_skipping(tmp_path):
    """With the C++ extension unimportable, the kernel tests fail (they used to skip)."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['mdp_kernels._C'] = None; import pytest; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
            "'test_contract.py::test_expected_backends_are_complete', "
            "'test_prototype_contrast.py::test_matches_reference']))")
    env = dict(os.environ, MDP_EXPECT_BACKENDS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, out.stdout[-2000:]
    assert "expected backend 'cpu' cannot run" in out.stdout
    assert "failed" in out.stdout.splitlines()[-1]
