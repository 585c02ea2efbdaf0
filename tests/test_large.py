"""Opt-in: the cpu backend beyond 32-bit element offsets (N * D > 2^31, bf16).

Not run by ``make test`` (about 11 GB of memory and a few minutes on 2 cores). Run with::

    MDP_LARGE_TEST=1 .venv/bin/python -m pytest -q tests/test_large.py

The loss and the feature gradient are checked against a float64 computation done in
chunks of pixels (the float64 logits of all pixels at once would not fit).
"""
import os

import pytest
import torch

import mdp_kernels as mk
from conftest import require

pytestmark = pytest.mark.skipif(os.environ.get("MDP_LARGE_TEST") != "1",
                                reason="opt-in: set MDP_LARGE_TEST=1 (about 11 GB, minutes)")

D, C, TAU = 256, 19, 0.1
N = 2**31 // D + 4099  # one more than 2^31 elements, and not a multiple of any block


def test_cpu_ce_beyond_int32_offsets():
    require("cpu", ("ce_fwd", "ce_bwd"))
    g = torch.Generator().manual_seed(0)
    f = torch.empty(N, D, dtype=torch.bfloat16)
    chunk = 1 << 20
    for s in range(0, N, chunk):  # unit rows, generated in chunks to bound float64 memory
        x = torch.randn(min(chunk, N - s), D, generator=g, dtype=torch.float64)
        f[s:s + chunk] = torch.nn.functional.normalize(x, dim=1).to(torch.bfloat16)
    assert f.numel() > 2**31
    p = torch.nn.functional.normalize(torch.randn(C, D, generator=g, dtype=torch.float64),
                                      dim=1).to(torch.bfloat16)
    y = torch.randint(0, C, (N,), generator=g)
    y[-4099:] = -100  # the tail, past 2^31, ignored: its gradient must be exactly 0
    f.requires_grad_()
    loss = mk.prototype_contrast_loss(f, p, y, tau=TAU, reduction="sum", backend="cpu")
    gf, = torch.autograd.grad(loss, f)
    total, err, norm = 0.0, 0.0, 0.0
    p64 = p.double()
    for s in range(0, N, chunk):
        x = f.detach()[s:s + chunk].double().requires_grad_()
        yy = y[s:s + chunk]
        z = x @ p64.t() / TAU
        keep = yy >= 0
        part = (torch.logsumexp(z, 1) - z.gather(1, yy.clamp(min=0)[:, None])[:, 0])[keep].sum()
        gx, = torch.autograd.grad(part, x)
        total += float(part)
        err += float((gf[s:s + chunk].double() - gx).square().sum())
        norm += float(gx.square().sum())
    assert abs(float(loss) - total) <= 1e-4 * abs(total)
    assert (err / norm) ** 0.5 <= 1e-2  # bf16 gradient output: about 2^-9 relative
    assert not gf[-4099:].any()
