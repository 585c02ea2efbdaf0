"""The reference backend against independent formulas: explicit loops over pixels and classes."""
import math

import pytest
import torch

from mdp_kernels import reference as R
from helpers import IGNORE, make_case

DT = torch.float64


def loop_ce(f, p, y, tau, ignore, allowed):
    """l(i, y_i) for each pixel of (N, D) features, None where the target is not valid."""
    out = []
    for i in range(f.shape[0]):
        yi = int(y[i])
        if yi == ignore or not allowed[yi]:
            out.append(None)
            continue
        logits = [float(f[i] @ p[k]) / tau for k in range(p.shape[0]) if allowed[k]]
        lse = math.log(sum(math.exp(v) for v in logits))
        out.append(lse - float(f[i] @ p[yi]) / tau)
    return out


def flat(f, y):
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), y.reshape(-1)


@pytest.mark.parametrize("masked", [False, True])
def test_ce_matches_loops(masked):
    f, p, y = make_case(2, 5, 7, (3, 4), dtype=DT)
    allowed = torch.ones(7, dtype=torch.bool)
    if masked:
        allowed[[1, 4]] = False
    cm = allowed if masked else None
    ff, yy = flat(f, y)
    per = loop_ce(ff, p, yy, 0.1, IGNORE, allowed)
    valid = [v for v in per if v is not None]
    got = R.prototype_contrast_loss(f, p, y, 0.1, IGNORE, cm)
    assert abs(float(got) - sum(valid) / len(valid)) < 1e-10
    got_sum = R.prototype_contrast_loss(f, p, y, 0.1, IGNORE, cm, reduction="sum")
    assert abs(float(got_sum) - sum(valid)) < 1e-9
    none = R.prototype_contrast_loss(f, p, y, 0.1, IGNORE, cm, reduction="none")
    assert none.shape == y.shape
    expect = torch.tensor([0.0 if v is None else v for v in per], dtype=DT)
    torch.testing.assert_close(none.reshape(-1), expect, rtol=1e-10, atol=1e-12)


def test_mixing_per_image_lam_matches_loops():
    f, p, y = make_case(3, 4, 6, (2, 5), dtype=DT)
    yb = torch.randint(0, 6, y.shape)
    yb[0, 0, :3] = IGNORE
    lam = torch.tensor([0.2, 0.7, 1.0], dtype=DT)
    ff, ya = flat(f, y)
    _, yb_ = flat(f, yb)
    allowed = torch.ones(6, dtype=torch.bool)
    la, lb = loop_ce(ff, p, ya, 0.07, IGNORE, allowed), loop_ce(ff, p, yb_, 0.07, IGNORE, allowed)
    lam_px = lam.repeat_interleave(10)
    ta = [float(lam_px[i]) * v for i, v in enumerate(la) if v is not None]
    tb = [(1 - float(lam_px[i])) * v for i, v in enumerate(lb) if v is not None]
    got = R.prototype_contrast_loss(f, p, y, 0.07, IGNORE, None, yb, lam)
    assert abs(float(got) - (sum(ta) / len(ta) + sum(tb) / len(tb))) < 1e-9
    none = R.prototype_contrast_loss(f, p, y, 0.07, IGNORE, None, yb, lam, reduction="none")
    expect = [float(lam_px[i]) * (a or 0.0) + (1 - float(lam_px[i])) * (b or 0.0)
              for i, (a, b) in enumerate(zip(la, lb))]
    torch.testing.assert_close(none.reshape(-1), torch.tensor(expect, dtype=DT))


def test_scalar_lam_equals_two_cross_entropies():
    f, p, y = make_case(2, 8, 5, (4, 4), dtype=DT)
    yb = torch.randint(0, 5, y.shape)
    logits = torch.einsum("bdhw,cd->bchw", f, p) / 0.07
    ce = torch.nn.functional.cross_entropy
    expect = 0.3 * ce(logits, y, ignore_index=IGNORE) + 0.7 * ce(logits, yb, ignore_index=IGNORE)
    got = R.prototype_contrast_loss(f, p, y, 0.07, IGNORE, None, yb, 0.3)
    torch.testing.assert_close(got, expect)


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_consistency_matches_loops(kind):
    f, p, _ = make_case(1, 4, 5, (2, 3), dtype=DT)
    g = torch.nn.functional.normalize(f + 0.3 * torch.randn_like(f), dim=1)
    mask = torch.rand(1, 2, 3) > 0.3
    ff, gg = f.permute(0, 2, 3, 1).reshape(-1, 4), g.permute(0, 2, 3, 1).reshape(-1, 4)
    vals = []
    for i, m in enumerate(mask.reshape(-1)):
        if not m:
            continue
        zs = [float(ff[i] @ p[k]) / 0.07 for k in range(5)]
        zt = [float(gg[i] @ p[k]) / 0.04 for k in range(5)]
        ls, lt = (math.log(sum(math.exp(v) for v in z)) for z in (zs, zt))
        t = [math.exp(v - lt) for v in zt]
        val = -sum(t[k] * (zs[k] - ls) for k in range(5))
        if kind == "kl":
            val -= -sum(t[k] * math.log(t[k]) for k in range(5))
        vals.append(val)
    got = R.prototype_consistency_loss(f, g, p, 0.07, 0.04, mask, None, kind)
    assert abs(float(got) - sum(vals) / len(vals)) < 1e-10


def test_pixel_contrast_matches_loops():
    q, _, yq = make_case(2, 4, 3, (2, 3), dtype=DT, ignore_frac=0.2)
    k, _, yk = make_case(2, 4, 3, (3, 2), dtype=DT, ignore_frac=0.2)
    yk[1] = 2  # image 1's key view has one class: its other query pixels drop out
    vals = []
    for b in range(2):
        qq, kk = q[b].reshape(4, -1).t(), k[b].reshape(4, -1).t()
        ya, yb = yq[b].reshape(-1), yk[b].reshape(-1)
        for i in range(qq.shape[0]):
            pos = [j for j in range(kk.shape[0]) if yb[j] == ya[i]]
            if ya[i] == IGNORE or not pos:
                continue
            z = [float(qq[i] @ kk[j]) / 0.07 for j in range(kk.shape[0]) if yb[j] != IGNORE]
            lse = math.log(sum(math.exp(v) for v in z))
            vals.append(lse - sum(float(qq[i] @ kk[j]) / 0.07 for j in pos) / len(pos))
    got = R.pixel_contrast_loss(q, yq, k, yk, 0.07, IGNORE)
    assert abs(float(got) - sum(vals) / len(vals)) < 1e-10


def test_class_sums_and_pool_match_loops():
    f, _, y = make_case(2, 3, 4, (3, 3), dtype=DT)
    sums, counts = R.class_embedding_sums(f, y, 4)
    means, present = R.masked_average_pool(f, y, 4)
    for b in range(2):
        for j in range(4):
            sel = (y[b] == j)
            assert counts[b, j] == int(sel.sum())
            expect = f[b][:, sel].sum(-1)
            torch.testing.assert_close(sums[b, j], expect)
            assert bool(present[b, j]) == bool(sel.any())
            if sel.any():
                torch.testing.assert_close(means[b, j], expect / sel.sum())


def test_pseudo_label_threshold_and_ties():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=DT)
    f = torch.tensor([[0.9, 0.1], [0.1, 0.5], [0.0, 0.95]], dtype=DT)  # (N, D)
    labels, scores = R.pseudo_label(f, p, 0.8, None, IGNORE)
    assert labels.tolist() == [0, IGNORE, 2]  # tie between classes 0 and 1 -> 0
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.5, 0.95]))


def test_reference_gradcheck():
    f, p, y = make_case(2, 3, 4, (2, 3), dtype=DT)
    yb = torch.randint(0, 4, y.shape)
    cm = torch.tensor([True, True, False, True])
    f.requires_grad_()
    p.requires_grad_()
    lam = torch.tensor([0.25, 0.6], dtype=DT)
    assert torch.autograd.gradcheck(
        lambda f, p: R.prototype_contrast_loss(f, p, y, 0.5, IGNORE, cm, yb, lam), (f, p))
