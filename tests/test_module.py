"""PrototypeContrastLoss: the module equals the functional composition it documents."""
import pytest
import torch

import mdp_kernels as mk
from helpers import make_case, unit


def test_forward_composes_bank_class_and_consistency_terms():
    f, _, y = make_case(2, 16, 7, (4, 5))
    key = unit(f + 0.1 * torch.randn_like(f))
    s, t = unit(torch.randn_like(f)), unit(torch.randn_like(f))
    yb = torch.randint(0, 7, y.shape)
    loss_fn = mk.PrototypeContrastLoss(7, 16, bank_images=8, batch_size=2, alpha=0.3)
    assert loss_fn.bank.num_slots == 4
    f.requires_grad_()
    loss = loss_fn(f, y, key, labels_b=yb, lam=0.6, con_student=s, con_teacher=t)
    p, valid = loss_fn.bank.prototypes()
    expect_class = mk.prototype_contrast_loss(f, p, y, class_mask=valid, labels_b=yb, lam=0.6)
    expect_con = mk.prototype_consistency_loss(s, t, p, class_mask=valid)
    torch.testing.assert_close(loss, expect_class + 0.3 * expect_con)
    torch.testing.assert_close(loss_fn.last_terms["class"], expect_class.detach())
    torch.testing.assert_close(loss_fn.last_terms["con"], expect_con)
    assert int(loss_fn.last_terms["valid_classes"]) == int(valid.sum())
    loss.backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()
    assert "bank.slot_sums" in loss_fn.state_dict()


def test_loss_falls_when_training_embeddings():
    torch.manual_seed(1)
    c, d = 6, 8
    emb = torch.nn.Parameter(1.0 + 0.05 * torch.randn(c, d))  # classes start entangled
    loss_fn = mk.PrototypeContrastLoss(c, d, bank_images=4, batch_size=2)
    opt = torch.optim.SGD([emb], lr=0.5)
    losses = []
    for _ in range(30):
        y = torch.randint(0, c, (2, 4, 4))
        feats = unit(emb[y].permute(0, 3, 1, 2) + 0.05 * torch.randn(2, d, 4, 4))
        loss = loss_fn(feats, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def test_per_image_class_mask_is_combined_with_the_bank():
    f, _, y = make_case(2, 16, 7, (4, 5))
    cm = torch.ones(2, 7, dtype=torch.bool)
    cm[1, :3] = False  # image 1's dataset has classes 3..6 only
    loss_fn = mk.PrototypeContrastLoss(7, 16, bank_images=4, batch_size=2)
    loss = loss_fn(f, y, class_mask=cm)
    p, valid = loss_fn.bank.prototypes()
    torch.testing.assert_close(loss, mk.prototype_contrast_loss(f, p, y, class_mask=cm & valid))
    with pytest.raises(ValueError, match="class_mask must have shape"):
        loss_fn(f, y, class_mask=torch.ones(3, 7, dtype=torch.bool))
