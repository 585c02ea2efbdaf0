"""class_embedding_sums / masked_average_pool: kernel backends against the reference."""
import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import IGNORE, make_case, rel_err

OPS = ("class_sums", "class_sums_bwd")


@pytest.mark.parametrize("c,hw", [(1, (3, 5)), (19, (7, 9)), (150, (5, 11)), (1000, (3, 7))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, c, hw, dtype):
    device = require(backend, OPS)
    f, _, y = make_case(3, 20, c, hw, dtype=dtype)
    w = torch.randn(3, c, 20, dtype=torch.float64)
    outs = []
    for be, ff, yy in ((backend, f.to(device), y.to(device)), ("reference", f.double(), y)):
        ff = ff.detach().clone().requires_grad_()
        means, present = mk.masked_average_pool(ff, yy, c, backend=be)
        sums, counts = mk.class_embedding_sums(ff, yy, c, backend=be)
        (g,) = torch.autograd.grad((means * w.to(means)).sum(), ff)
        outs.append((sums.detach().cpu(), counts.cpu(), present.cpu(), g.cpu()))
    (s, n, pr, g), (rs, rn, rpr, rg) = outs
    assert torch.equal(n, rn) and torch.equal(pr, rpr)
    assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(s, rs) <= 1e-6 and rel_err(g, rg) <= 1e-6


def test_flat_strided_and_low_precision(backend):
    device = require(backend, OPS)
    f, _, y = make_case(2, 16, 19, (6, 5))
    ref, _ = mk.class_embedding_sums(f.double(), y, 19, backend="reference")
    flat = f.permute(0, 2, 3, 1).reshape(-1, 16)
    s, _ = mk.class_embedding_sums(flat.to(device), y.reshape(-1).to(device), 19, backend=backend)
    assert s.shape == (1, 19, 16)
    assert rel_err(s.cpu()[0], ref.sum(0)) <= 1e-6
    cl = f.contiguous(memory_format=torch.channels_last).to(device)
    s, _ = mk.class_embedding_sums(cl, y.to(device), 19, backend=backend)
    assert rel_err(s.cpu(), ref) <= 1e-6
    for dtype in (torch.bfloat16, torch.float16):
        s, _ = mk.class_embedding_sums(f.to(dtype).to(device), y.to(device), 19, backend=backend)
        truth, _ = mk.class_embedding_sums(f.to(dtype).double(), y, 19, backend="reference")
        assert s.dtype == torch.float32 and rel_err(s.cpu(), truth) <= 1e-6


def test_gradcheck_and_all_ignored(backend):
    device = require(backend, OPS)
    f, _, y = make_case(2, 5, 4, (3, 3), dtype=torch.float64, device=device)
    f.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f: mk.masked_average_pool(f, y, 4, backend=backend)[0], (f,))
    y = torch.full_like(y, IGNORE)
    means, present = mk.masked_average_pool(f, y, 4, backend=backend)
    assert not present.any() and not means.any()


def test_deterministic(backend):
    device = require(backend, OPS)
    f, _, y = make_case(4, 64, 37, (16, 16), device=device)
    a, _ = mk.class_embedding_sums(f, y, 37, backend=backend)
    b, _ = mk.class_embedding_sums(f, y, 37, backend=backend)
    assert torch.equal(a, b)
