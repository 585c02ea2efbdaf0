"""CUDA-backend paths that the shared tests' small shapes do not reach: several pixel chunks
per image (partial sums reduced in order), vector loads, class sums accumulated in global
memory (large C), tiles straddling images, several dprotos splits. Skipped without a GPU."""
import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import make_case, rel_err


@pytest.mark.parametrize("c", [19, 342, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "flat"])
def test_class_sums_large(c, dtype, layout):
    device = require("cuda", ("class_sums", "class_sums_bwd"))
    f, _, y = make_case(2, 48, c, (40, 40), dtype=dtype)
    truth, counts = mk.class_embedding_sums(f.double(), y, c, backend="reference")
    if layout == "channels_last":
        f = f.contiguous(memory_format=torch.channels_last)
    elif layout == "flat":  # (N, D): one image of 3200 pixels
        f, y = f.permute(0, 2, 3, 1).reshape(-1, 48), y.reshape(-1)
        truth, counts = truth.sum(0, keepdim=True), counts.sum(0, keepdim=True)
    s, n = mk.class_embedding_sums(f.to(device), y.to(device), c, backend="cuda")
    assert torch.equal(n.cpu(), counts)
    assert rel_err(s.cpu(), truth) <= 1e-6
    s2, _ = mk.class_embedding_sums(f.to(device), y.to(device), c, backend="cuda")
    assert torch.equal(s, s2)


@pytest.mark.parametrize("c", [171, 342])
def test_prototype_contrast_large(c):
    device = require("cuda", ("ce_fwd", "ce_bwd"))
    f, p, y = make_case(3, 40, c, (33, 37))  # 3663 pixels: tiles straddle images
    yb = torch.randint(0, c, y.shape)
    cm = torch.rand(c) > 0.1
    lam = torch.tensor([0.2, 0.6, 0.9])
    outs = []
    for be, dev, cast in (("cuda", device, lambda t: t), ("reference", "cpu", torch.Tensor.double)):
        ff = cast(f).to(dev).requires_grad_()
        pp = cast(p).to(dev).requires_grad_()
        loss = mk.prototype_contrast_loss(ff, pp, y.to(dev), class_mask=cm.to(dev),
                                          labels_b=yb.to(dev), lam=lam.to(dev), backend=be)
        outs.append((loss.detach().cpu(), *(g.cpu() for g in torch.autograd.grad(loss, (ff, pp)))))
    for name, a, b in zip(("loss", "dfeats", "dprotos"), *outs):
        assert rel_err(a, b) <= 1e-5, name


def test_pseudo_label_large():
    device = require("cuda", ("pseudo_label",))
    f, p, _ = make_case(3, 40, 342, (33, 37))
    ref_l, ref_s = mk.pseudo_label(f.double(), p.double(), threshold=0.3, backend="reference")
    got_l, got_s = mk.pseudo_label(f.to(device), p.to(device), threshold=0.3, backend="cuda")
    torch.testing.assert_close(got_s.cpu(), ref_s.float(), rtol=1e-5, atol=1e-6)
    # Labels must agree except where fp32 rounding may flip the argmax or the threshold.
    top2 = torch.einsum("bdhw,cd->bhwc", f.double(), p.double()).topk(2, dim=-1).values
    sure = (top2[..., 0] - top2[..., 1] > 1e-5) & ((ref_s - 0.3).abs() > 1e-5)
    assert sure.float().mean() > 0.9
    assert torch.equal(got_l.cpu()[sure], ref_l[sure])
