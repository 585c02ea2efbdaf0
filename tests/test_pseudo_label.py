"""pseudo_label: kernel backends against the reference."""
import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import IGNORE, make_case

OPS = ("pseudo_label",)


@pytest.mark.parametrize("c", [1, 19, 150, 1000])
def test_matches_reference(backend, c):
    device = require(backend, OPS)
    f, p, _ = make_case(2, 16, c, (7, 9))
    cm = torch.rand(c) > 0.2
    cm[0] = True
    for kw in ({}, {"class_mask": cm}):
        ref_l, ref_s = mk.pseudo_label(f.double(), p.double(), threshold=0.3, backend="reference",
                                       **kw)
        got_l, got_s = mk.pseudo_label(f.to(device), p.to(device), threshold=0.3, backend=backend,
                                       **{k: v.to(device) for k, v in kw.items()})
        assert got_l.shape == (2, 7, 9) and got_l.dtype == torch.int64
        torch.testing.assert_close(got_s.cpu(), ref_s, rtol=1e-5, atol=1e-6)
        # where the top two reference scores are closer than the fp32 error, either is right
        sims = torch.einsum("bdhw,cd->bhwc", f.double(), p.double())
        if "class_mask" in kw:
            sims = sims.masked_fill(~cm, float("-inf"))
        top = sims.topk(min(2, c), dim=-1).values
        near_tie = (top[..., 0] - top[..., -1] < 1e-5) if c > 1 else torch.zeros_like(ref_s, dtype=torch.bool)
        assert torch.equal(got_l.cpu()[~near_tie], ref_l[~near_tie])
        assert (~near_tie).float().mean() > 0.9  # the comparison covers nearly every pixel


def test_ties_take_lowest_index_and_threshold(backend):
    device = require(backend, OPS)
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]], device=device)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.0], [0.6, 0.8]], device=device)
    labels, scores = mk.pseudo_label(f, p, threshold=0.8, backend=backend)
    assert labels.tolist() == [1, 0, IGNORE, 3]
    torch.testing.assert_close(scores.cpu(), torch.tensor([1.0, 1.0, 0.6, 1.0]))
