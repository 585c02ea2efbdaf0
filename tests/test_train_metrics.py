"""mIoU the MMSegmentation way, checked against hand-computed confusion matrices; exact
t-SNE affinities and embedding."""
import math

import pytest
import torch

from mdp_train.metrics import IoUMeter
from mdp_train.tsne import affinities, conditional, kl_divergence, tsne


def _meter():
    # valid (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,0) (0,0); two ignored pixels predicted as 2
    # and 3: they must count nowhere, so class 3 stays absent from both -> nan.
    gt = torch.tensor([[0, 0, 1, 1], [2, 255, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 3, 0]])
    m = IoUMeter(4, 255)
    m.update(pred, gt)
    return m


def test_confusion_and_iou_by_hand():
    m = _meter()
    want = torch.zeros(4, 4, dtype=torch.int64)
    want[0, 0], want[0, 1], want[1, 1], want[2, 0] = 2, 1, 2, 1
    assert torch.equal(m.conf, want)
    iou = m.iou()
    # class 0: TP 2, |pred 0| 3, |gt 0| 3 -> 2 / 4; class 1: 2 / (3 + 2 - 2); class 2: 0 / 1
    assert iou[:3].tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert math.isnan(iou[3])
    assert m.miou() == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert m.accuracy() == pytest.approx(4 / 6)
    table = m.table(["a", "b", "c", "d"])
    assert "| d | nan | 0 |" in table and "**38.89**" in table


def test_accumulates_over_split_not_per_image_mean():
    gt1, p1 = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0])
    gt2, p2 = torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1])
    m = IoUMeter(2)
    m.update(p1, gt1)
    m.update(p2, gt2)
    whole = IoUMeter(2)
    whole.update(torch.cat([p1, p2]), torch.cat([gt1, gt2]))
    assert torch.equal(m.conf, whole.conf)
    # class 0: 3 / 4, class 1: 4 / 5 over the split (per-image means would differ)
    assert m.miou() == pytest.approx((3 / 4 + 4 / 5) / 2)


def test_all_ignored_and_bad_input():
    m = IoUMeter(3)
    m.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    assert math.isnan(m.miou()) and math.isnan(m.accuracy())
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="ground truth"):
        m.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="predictions"):
        m.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="names"):
        m.table(["a"])


def test_affinities_hit_the_perplexity():
    x = torch.randn(120, 7, generator=torch.Generator().manual_seed(0))
    for perp in (5.0, 15.0, 40.0):
        pc = conditional(x, perp)
        assert float(pc.diagonal().abs().max()) == 0.0
        assert pc.sum(1).tolist() == pytest.approx([1.0] * 120)
        ent = -(pc * pc.clamp(min=1e-300).log()).sum(1)
        assert ent.exp().tolist() == pytest.approx([perp] * 120, rel=1e-4)
    p = affinities(x, 15.0)
    assert torch.allclose(p, p.t()) and float(p.sum()) == pytest.approx(1.0)
    assert torch.allclose(p, (conditional(x, 15.0) + conditional(x, 15.0).t()) / 240)


def test_tsne_separates_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 10, generator=g) * 8
    x = torch.cat([c + torch.randn(30, 10, generator=g) for c in centres])
    y = torch.arange(3).repeat_interleave(30)
    emb = tsne(x, perplexity=10, seed=0)
    assert emb.shape == (90, 2) and bool(emb.isfinite().all())
    d = torch.cdist(emb, emb)
    d.fill_diagonal_(math.inf)
    assert bool((y[d.argmin(1)] == y).all())  # 1-NN in the embedding keeps the cluster
    p = affinities(x, 10)
    rand = torch.randn(90, 2, generator=g) * float(emb.std())
    assert kl_divergence(p, emb) < 0.5 * kl_divergence(p, rand)
    with pytest.raises(ValueError):
        tsne(torch.randn(2, 3))
    with pytest.raises(ValueError):
        affinities(torch.randn(5, 3), 10)
