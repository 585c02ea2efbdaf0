"""CPU kernels only: chunk-size invariance, run-to-run determinism, skipped pixels, bank."""
import os
import subprocess
import sys

import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import IGNORE, PATH_TOL, make_case, rel_err, unit

ALL_OPS = ("ce_fwd", "ce_bwd", "con_fwd", "con_bwd", "pix_fwd", "pix_bwd", "pseudo_label",
           "bank_slot", "bank_prototypes", "ce_fwd_basis", "ce_bwd_basis", "con_fwd_basis",
           "con_bwd_basis")


@pytest.fixture(autouse=True)
def _cpu():
    require("cpu", ALL_OPS)


def outputs(c=37):
    """Every differentiable fused op on one odd-shaped case (B=2, 13x11 pixels, C=c):
    losses ("none") and gradients, with ignored pixels, a class mask and mixing."""
    torch.manual_seed(c)
    f, p, y = make_case(2, 24, c, (13, 11))
    g = unit(f + 0.3 * torch.randn_like(f))
    yb = torch.randint(0, c, y.shape)
    cm = torch.rand(c) > 0.2
    cm[y[0, 0, 0] % c] = cm[0] = True
    res = []
    for name, fn in (
        ("ce", lambda f, p: mk.prototype_contrast_loss(f, p, y, labels_b=yb, lam=0.3,
                                                       class_mask=cm, reduction="none",
                                                       backend="cpu")),
        ("con", lambda f, p: mk.prototype_consistency_loss(f, g, p, kind="kl", class_mask=cm,
                                                           reduction="none", backend="cpu")),
        ("pix", lambda f, p: mk.pixel_contrast_loss(f, y, g, yb, num_classes=c,
                                                    reduction="none", backend="cpu")),
    ):
        fr, pr = f.clone().requires_grad_(), p.clone().requires_grad_()
        loss = fn(fr, pr)
        w = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)
        (loss * w).sum().backward()
        res += [(name, loss.detach()), (name + ".df", fr.grad),
                (name + ".dp", pr.grad if pr.grad is not None else torch.zeros(1))]
    res += list(zip(("pl.labels", "pl.scores"), mk.pseudo_label(f, p, threshold=0.2,
                                                                  class_mask=cm, backend="cpu")))
    return res


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_chunk_size_invariance(rows):
    base = outputs()
    with mk.config.override(cpu_tile_rows=rows):
        chunked = outputs()
    for (name, a), (_, b) in zip(chunked, base):
        if a.dtype == torch.int64:
            assert torch.equal(a, b), name
        else:
            assert rel_err(a, b) <= PATH_TOL, f"{name}: {rel_err(a, b):.3g}"


def test_bad_tile_rows():
    for bad in (0, -3, 2.0, True, "8"):
        with pytest.raises(ValueError, match="config.cpu_tile_rows must be a positive int"):
            mk.config.cpu_tile_rows = bad
    assert mk.config.cpu_tile_rows is None  # a refused value changes nothing
    code = "import mdp_kernels"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, MDP_CPU_TILE_ROWS="0"))
    assert out.returncode != 0 and "MDP_CPU_TILE_ROWS must be a positive integer" in out.stderr


def test_two_runs_identical():
    first = outputs(150)
    for (name, a), (_, b) in zip(outputs(150), first):
        assert torch.equal(a, b), name


def test_skipped_pixels_are_exactly_zero():
    """Pixels with no target (CE), masked-out pixels (consistency) and invalid queries / keys
    (pixel-to-pixel) get exactly 0 outputs and 0 gradients: they are compacted away before
    the tile products rather than computed and multiplied by 0."""
    ops = torch.ops.mdp_ext
    f, p, y = make_case(2, 16, 9, (6, 7))
    f3 = f.flatten(2)
    ta = torch.where(y == IGNORE, -1, y).flatten(1).contiguous()
    skip = ta < 0
    assert skip.any() and not skip.all()
    sw = torch.rand(9) + 0.5  # label smoothing's term too: 0 on skipped pixels
    args = dict(feats=f3, protos=p, ta=ta, tb=None, bias=None, sw=sw, tau=0.1)
    lse, za, zb, zq = ops.ce_fwd(**args)
    assert (lse[skip] == 0).all() and (za[skip] == 0).all() and (lse[~skip] != 0).all()
    assert (zq[skip] == 0).all() and (zq[~skip] != 0).all()
    g = torch.rand_like(lse) + 0.5
    grads = dict(g_lse=g, g_za=-g, g_zb=None, g_zq=0.1 * g)
    df, dp = ops.ce_bwd(**grads, feats=f3, protos=p, ta=ta, tb=None, bias=None, sw=sw, lse=lse,
                        tau=0.1, need_feats=True, need_protos=True)
    assert (df.permute(0, 2, 1)[skip] == 0).all() and (df.permute(0, 2, 1)[~skip] != 0).all()
    e = ops.ce_fwd_basis(**args)[4]
    assert (e.permute(0, 2, 1)[skip] == 0).all() and (e.permute(0, 2, 1)[~skip] != 0).all()
    dfb = ops.ce_bwd_basis(**grads, E=e, feats=f3, protos=p, ta=ta, tb=None, sw=sw, tau=0.1)
    assert (dfb.permute(0, 2, 1)[skip] == 0).all() and rel_err(dfb, df) <= PATH_TOL
    outp = ops.ce_fwd_probs(**args)
    assert all(torch.equal(a, b) for a, b in zip(outp[:4], (lse, za, zb, zq)))
    sm = outp[4]
    assert (sm[skip] == 0).all() and rel_err(sm.sum(-1)[~skip], torch.ones(1)) <= PATH_TOL
    dfp, dpp = ops.ce_bwd_probs(**grads, S=sm, feats=f3, protos=p, ta=ta, tb=None, sw=sw,
                                tau=0.1, need_feats=True, need_protos=True)
    assert (dfp.permute(0, 2, 1)[skip] == 0).all() and rel_err(dfp, df) <= PATH_TOL
    assert rel_err(dpp, dp) <= PATH_TOL
    mask = ~skip
    out = ops.con_fwd(f3, f3.flip(1), p, None, mask, 0.1, 0.05)
    assert all((o[skip] == 0).all() for o in out)
    ds, _ = ops.con_bwd(g, f3, f3.flip(1), p, None, mask, out[2], out[3], 0.1, 0.05, True, False)
    assert (ds.permute(0, 2, 1)[skip] == 0).all() and (ds.permute(0, 2, 1)[mask] != 0).all()
    outb = ops.con_fwd_basis(f3, f3.flip(1), p, None, mask, 0.1, 0.05)
    assert all(torch.equal(a, b) for a, b in zip(outb[:4], out))
    gs = outb[4]
    assert (gs.permute(0, 2, 1)[skip] == 0).all() and (gs.permute(0, 2, 1)[mask] != 0).all()
    assert rel_err(ops.con_bwd_basis(g, gs, f3), ds) <= PATH_TOL
    plse = ops.pix_fwd(f3, f3.flip(1), mask, mask, 0.1)
    assert (plse[skip] == 0).all() and (plse[mask] != 0).all()
    dq, dk = ops.pix_bwd(g, f3, f3.flip(1), mask, mask, plse, 0.1, True, True)
    for d in (dq, dk):
        assert (d.permute(0, 2, 1)[skip] == 0).all() and (d.permute(0, 2, 1)[mask] != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
def test_bank_kernels_match_reference(dtype, normalize):
    b, c, d, k = 3, 7, 5, 4
    counts = torch.randint(0, 4, (b, c))
    counts[:, 2] = 0  # a class no image contains
    sums = torch.randn(b, c, d, dtype=dtype) * counts.unsqueeze(-1)
    s, n = torch.ops.mdp_ext.bank_slot(sums, counts)
    rs, rn = mk.reference.bank_slot(sums.double(), counts)
    assert s.dtype == dtype and n.dtype == dtype
    assert rel_err(s, rs) <= PATH_TOL and torch.equal(n.double(), rn)
    slots_s = torch.randn(k, c, d, dtype=dtype)
    slots_n = torch.randint(0, 3, (k, c)).to(dtype)
    slots_n[:, 4] = 0
    slots_s[:, 4] = 0
    P, valid = torch.ops.mdp_ext.bank_prototypes(slots_s, slots_n, normalize)
    rP, rvalid = mk.reference.bank_prototypes(slots_s.double(), slots_n.double(), normalize)
    assert torch.equal(valid, rvalid) and not valid[4] and not P[4].any()
    assert rel_err(P, rP) <= PATH_TOL


# ---------------------------------------------------------------- CE saved basis / softmax
@pytest.fixture(autouse=True)
def _basis_for_any_c():
    """The tests below use small C; take the basis path there unless a test says not to."""
    with mk.config.override(save="basis"):
        yield


def ce_grads(f, p, y, yb, cm, need_p, save):
    """(loss, dF, dP) of a mixed, masked CE with the forward keeping ``save`` ("basis",
    "probs", or "none": the backward recomputes the logits). Not ``loss_and_grads``: whether
    the prototypes require grad (``need_p``) is part of what steers the saved tensors."""
    with mk.config.override(save=save):
        fr, pr = f.clone().requires_grad_(), p.clone().requires_grad_(need_p)
        loss = mk.prototype_contrast_loss(fr, pr, y, labels_b=yb, lam=0.3, class_mask=cm,
                                          reduction="none", backend="cpu")
        w = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)
        (loss * w).sum().backward()
    return loss.detach(), fr.grad, pr.grad


def ce_case(c, dtype=torch.float32, layout="bdhw", ignore_frac=0.2):
    torch.manual_seed(c)
    f, p, y = make_case(2, 24, c, (13, 11), dtype=dtype, ignore_frac=ignore_frac)
    yb = torch.randint(0, c, y.shape)
    cm = torch.rand(c) > 0.2
    cm[0] = True
    if layout == "nd":  # pixel-major (N, D): the other loop order of ce_bwd_basis
        f, y, yb = f.permute(0, 2, 3, 1).reshape(-1, 24), y.flatten(), yb.flatten()
    return f, p, y, yb, cm


@pytest.mark.parametrize("save", ["basis", "probs"])
@pytest.mark.parametrize("c", [1, 19, 150])
@pytest.mark.parametrize("layout", ["bdhw", "nd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("need_p", [False, True])
def test_saved_matches_recompute(save, c, layout, dtype, need_p):
    f, p, y, yb, cm = ce_case(c, dtype, layout)
    lb, fb, pb = ce_grads(f, p, y, yb, cm, need_p, save)
    lr, fr, pr = ce_grads(f, p, y, yb, cm, need_p, "none")
    assert torch.equal(lb, lr)
    assert fb.dtype == f.dtype and fb.stride() == f.stride()
    if c == 1:  # one class: softmax = 1, dF is 0 up to rounding on both paths
        assert fb.abs().max() <= 1e-5 and fr.abs().max() <= 1e-5
    else:
        assert rel_err(fb, fr) <= PATH_TOL, rel_err(fb, fr)
    if need_p and save == "basis":  # dP recomputes the tiles as without a basis
        assert torch.equal(pb, pr)
    elif need_p:
        assert rel_err(pb, pr) <= PATH_TOL, rel_err(pb, pr)


def test_probs_all_pixels_kept():
    """No ignored pixel: every chunk writes its softmax straight into S's rows."""
    f, p, y, yb, cm = ce_case(19, ignore_frac=0.0)
    cm[:] = True
    got = ce_grads(f, p, y, yb, cm, True, "probs")
    ref = ce_grads(f, p, y, yb, cm, True, "none")
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= PATH_TOL, rel_err(a, b)


@pytest.mark.parametrize("save", ["basis", "probs"])
def test_saved_low_precision(save):
    f, p, y, yb, cm = ce_case(37, torch.bfloat16)
    _, fb, _ = ce_grads(f, p, y, yb, cm, False, save)
    _, fr, _ = ce_grads(f, p, y, yb, cm, False, "none")
    assert fb.dtype == torch.bfloat16 and rel_err(fb, fr) <= 1e-2


@pytest.mark.parametrize("save", ["basis", "probs"])
@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_saved_chunk_size_invariance(save, rows):
    f, p, y, yb, cm = ce_case(37)
    base = ce_grads(f, p, y, yb, cm, True, save)
    with mk.config.override(cpu_tile_rows=rows):
        chunked = ce_grads(f, p, y, yb, cm, True, save)
    for a, b in zip(chunked, base):
        assert rel_err(a, b) <= PATH_TOL, rel_err(a, b)


def test_saved_only_with_a_gradient(monkeypatch):
    calls = []
    for op in ("ce_fwd_basis", "ce_fwd_probs"):
        fn = mk.dispatch.kernel(op, "cpu")
        monkeypatch.setitem(mk.dispatch._kernels["cpu"], op,
                            lambda fn=fn, op=op, **kw: calls.append(op) or fn(**kw))
    f, p, y = make_case(2, 16, 5, (4, 3))
    fr, pr = f.clone().requires_grad_(), p.clone().requires_grad_()
    with torch.no_grad():
        mk.prototype_contrast_loss(fr, pr, y, backend="cpu")
    mk.prototype_contrast_loss(f, p, y, backend="cpu")
    assert not calls
    with mk.config.override(save="auto"):  # the cpu policy: 5 classes, 2 C <= D: probs
        mk.prototype_contrast_loss(f, pr, y, backend="cpu").backward()
    assert calls == ["ce_fwd_probs"]
    mk.prototype_contrast_loss(fr, p, y, backend="cpu").backward()
    assert calls == ["ce_fwd_probs", "ce_fwd_basis"]


def test_saved_choice():
    """The cpu policy: basis from 96 classes with a feature gradient; probs: fewer classes
    and 2 C <= D (also for a prototype gradient alone); else nothing. ``config.save``
    overrides it where the kernels exist."""
    choose = mk.dispatch.saved_for_backward
    with mk.config.override(save="auto"):
        for c, d, need_f, need_p, expect in ((96, 64, True, False, "basis"),
                                             (96, 64, False, True, "none"),
                                             (95, 190, True, False, "probs"),
                                             (95, 189, True, True, "none"),
                                             (19, 64, False, True, "probs"),
                                             (19, 64, False, False, "none")):
            got = choose("ce", "cpu", c, d, feats_grad=need_f, protos_grad=need_p)
            assert got == expect, (c, d, need_f, need_p)
        assert choose("con", "cpu", 95, 190, feats_grad=True, protos_grad=False) == "none"
        # a reduced CE whose prototypes take a gradient: the gradients in the forward,
        # unless the softmax is kept; not for a loss without reduction or dP
        for c, d, reduced, need_p, expect in ((96, 64, True, True, "grad"),
                                              (19, 16, True, True, "grad"),
                                              (19, 64, True, True, "probs"),
                                              (96, 64, False, True, "basis"),
                                              (96, 64, True, False, "basis")):
            got = choose("ce", "cpu", c, d, feats_grad=True, protos_grad=need_p,
                         reduced=reduced)
            assert got == expect, (c, d, reduced, need_p)
        assert choose("con", "cpu", 96, 64, feats_grad=True, protos_grad=True,
                      reduced=True) == "basis"
        # a backend without the optional kernels
        assert choose("ce", "triton", 500, 64, feats_grad=True, protos_grad=True) == "none"
    with mk.config.override(save="probs"):
        assert choose("ce", "cpu", 500, 64, feats_grad=True, protos_grad=False) == "probs"
        assert choose("con", "cpu", 500, 64, feats_grad=True, protos_grad=False) == "none"
    with pytest.raises(ValueError, match="config.save must be one of"):
        mk.config.save = "all"


@pytest.mark.parametrize("save", ["basis", "probs"])
def test_saved_retain_graph_second_backward(save):
    """The saved tensor is not overwritten by the backward: a second backward gives the
    same gradients."""
    f, p, y = make_case(2, 16, 9, (6, 7))
    fr, pr = f.clone().requires_grad_(), p.clone().requires_grad_()
    with mk.config.override(save=save):
        loss = mk.prototype_contrast_loss(fr, pr, y, backend="cpu")
    g1 = torch.autograd.grad(loss, (fr, pr), retain_graph=True)
    g2 = torch.autograd.grad(loss, (fr, pr))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("save", ["basis", "probs", "none"])
def test_saved_gradcheck(save):
    f, p, y = make_case(2, 6, 5, (3, 4), dtype=torch.float64)
    yb = torch.randint(0, 5, y.shape)
    fn = lambda f, p: mk.prototype_contrast_loss(f, p, y, labels_b=yb, lam=0.4, backend="cpu")
    with mk.config.override(save=save):
        assert torch.autograd.gradcheck(fn, (f.clone().requires_grad_(),
                                             p.clone().requires_grad_()))


# ---------------------------------------------------------------- consistency basis path
def con_grads(s, t, p, mask, cm, kind, need_p, basis):
    """(loss, dS, dP) of a masked consistency loss; ``basis`` False forces the recompute
    (``need_p`` as in ``ce_grads``)."""
    with mk.config.override(save="basis" if basis else "none"):
        sr, pr = s.clone().requires_grad_(), p.clone().requires_grad_(need_p)
        loss = mk.prototype_consistency_loss(sr, t, pr, mask=mask, class_mask=cm, kind=kind,
                                             reduction="none", backend="cpu")
        w = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)
        (loss * w).sum().backward()
    return loss.detach(), sr.grad, pr.grad


def con_case(c, dtype=torch.float32, layout="bdhw"):
    torch.manual_seed(c)
    s, p, _ = make_case(2, 24, c, (13, 11), dtype=dtype)
    t = s + 0.5 * torch.randn_like(s)
    mask = torch.rand(2, 13, 11) > 0.3
    cm = torch.rand(c) > 0.2
    cm[0] = True
    if layout == "nd":  # pixel-major (N, D): the other loop order of con_bwd_basis
        s, t = (x.permute(0, 2, 3, 1).reshape(-1, 24) for x in (s, t))
        mask = mask.flatten()
    return s, t, p, mask, cm


@pytest.mark.parametrize("c", [1, 19, 150])
@pytest.mark.parametrize("layout", ["bdhw", "nd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("need_p", [False, True])
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_con_basis_matches_recompute(c, layout, dtype, need_p, kind):
    s, t, p, mask, cm = con_case(c, dtype, layout)
    lb, sb, pb = con_grads(s, t, p, mask, cm, kind, need_p, True)
    lr, sr, pr = con_grads(s, t, p, mask, cm, kind, need_p, False)
    assert torch.equal(lb, lr)
    assert sb.dtype == s.dtype and sb.stride() == s.stride()
    rows = sb if layout == "nd" else sb.movedim(1, -1)  # pixel-major view
    assert (rows[~mask] == 0).all()
    if c == 1:  # one class: softmax = t = 1, dS is 0 up to rounding on both paths
        assert sb.abs().max() <= 1e-5 and sr.abs().max() <= 1e-5
    else:
        assert rel_err(sb, sr) <= PATH_TOL, rel_err(sb, sr)
    if need_p:
        assert torch.equal(pb, pr)


def test_con_basis_no_mask_and_all_classes_masked():
    s, t, p, _, _ = con_case(37)
    for mask, cm in ((None, None), (None, torch.zeros(37, dtype=torch.bool))):
        lb, sb, _ = con_grads(s, t, p, mask, cm, "ce", False, True)
        lr, sr, _ = con_grads(s, t, p, mask, cm, "ce", False, False)
        assert torch.equal(lb, lr) and rel_err(sb, sr) <= PATH_TOL
    assert (sb == 0).all()


def test_con_basis_low_precision():
    s, t, p, mask, cm = con_case(37, torch.bfloat16)
    _, sb, _ = con_grads(s, t, p, mask, cm, "ce", False, True)
    _, sr, _ = con_grads(s, t, p, mask, cm, "ce", False, False)
    assert sb.dtype == torch.bfloat16 and rel_err(sb, sr) <= 1e-2


@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_con_basis_chunk_size_invariance(rows):
    s, t, p, mask, cm = con_case(37)
    base = con_grads(s, t, p, mask, cm, "kl", False, True)
    with mk.config.override(cpu_tile_rows=rows):
        chunked = con_grads(s, t, p, mask, cm, "kl", False, True)
    for a, b in zip(chunked[:2], base[:2]):
        assert rel_err(a, b) <= PATH_TOL, rel_err(a, b)


def test_con_basis_only_when_student_grad_is_taken(monkeypatch):
    calls = []
    fwd = mk.dispatch.kernel("con_fwd_basis", "cpu")
    monkeypatch.setitem(mk.dispatch._kernels["cpu"], "con_fwd_basis",
                        lambda **kw: calls.append(1) or fwd(**kw))
    s, p, _ = make_case(2, 8, 5, (4, 3))
    t = torch.randn_like(s)
    sr, pr = s.clone().requires_grad_(), p.clone().requires_grad_()
    with torch.no_grad():
        mk.prototype_consistency_loss(sr, t, pr, backend="cpu")
    mk.prototype_consistency_loss(s, t, pr, backend="cpu").backward()
    assert not calls and pr.grad is not None
    mk.prototype_consistency_loss(sr, t, p, backend="cpu").backward()
    assert len(calls) == 1
    with mk.config.override(save="auto"):  # the cpu policy: no basis for 5 classes
        mk.prototype_consistency_loss(sr, t, p, backend="cpu").backward()
    assert len(calls) == 1


def test_con_basis_retain_graph_second_backward():
    """G is not overwritten by the backward: a second backward gives the same gradient."""
    s, p, _ = make_case(2, 16, 9, (6, 7))
    sr = s.clone().requires_grad_()
    loss = mk.prototype_consistency_loss(sr, torch.randn_like(s), p, backend="cpu")
    (g1,) = torch.autograd.grad(loss, sr, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, sr)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("basis", [True, False])
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_con_basis_gradcheck(basis, kind):
    s, p, _ = make_case(2, 6, 5, (3, 4), dtype=torch.float64)
    t = torch.randn_like(s)
    mask = torch.rand(2, 3, 4) > 0.3
    fn = lambda s: mk.prototype_consistency_loss(s, t, p, mask=mask, kind=kind, backend="cpu")
    with mk.config.override(save="basis" if basis else "none"):
        assert torch.autograd.gradcheck(fn, (s.clone().requires_grad_(),))
