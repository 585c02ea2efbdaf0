"""Opt-in: the cpu backend beyond 32-bit element offsets (N * D > 2^31, bf16).

Not run by ``make test`` (about 16 GB of memory at peak and 5-8 minutes on 2 cores). Run with::

    MDP_LARGE_TEST=1 .venv/bin/python -m pytest -q -s tests/test_large.py

The loss and the feature gradient are checked against a float64 computation done in
chunks of pixels (the float64 logits of all pixels at once would not fit); ``-s`` shows
the measured errors and time.
"""
import os
import time

import pytest
import torch

import mdp_kernels as mk
from conftest import require

pytestmark = pytest.mark.skipif(os.environ.get("MDP_LARGE_TEST") != "1",
                                reason="opt-in: set MDP_LARGE_TEST=1 (about 16 GB, minutes)")

D, C, TAU = 256, 19, 0.1
TAIL = 4099  # rows past the 2^31-th element: not a multiple of any block
N = 2**31 // D + TAIL


def test_cpu_ce_beyond_int32_offsets():
    """The loss and every row's gradient, with most rows past 2^31 elements labelled (a
    32-bit offset that wrapped would read or write the wrong rows there), and every 7th
    ignored there (its gradient must be exactly 0). Prints the measured errors."""
    require("cpu", ("ce_fwd", "ce_bwd"))
    g = torch.Generator().manual_seed(0)
    f = torch.empty(N, D, dtype=torch.bfloat16)
    chunk = 1 << 20
    for s in range(0, N, chunk):  # unit rows, generated in chunks to bound float64 memory
        x = torch.randn(min(chunk, N - s), D, generator=g, dtype=torch.float64)
        f[s:s + chunk] = torch.nn.functional.normalize(x, dim=1).to(torch.bfloat16)
    assert f.numel() > 2**31 and (N - TAIL) * D == 2**31
    p = torch.nn.functional.normalize(torch.randn(C, D, generator=g, dtype=torch.float64),
                                      dim=1).to(torch.bfloat16)
    y = torch.randint(0, C, (N,), generator=g)
    y[-TAIL::7] = -100
    f.requires_grad_()
    t0 = time.perf_counter()
    loss = mk.prototype_contrast_loss(f, p, y, tau=TAU, reduction="sum", backend="cpu")
    gf, = torch.autograd.grad(loss, f)
    fused_s = time.perf_counter() - t0
    p64 = p.double()

    def truth(s, e):  # float64 loss and feature gradient of rows s:e
        x = f.detach()[s:e].double().requires_grad_()
        z = x @ p64.t() / TAU
        yy = y[s:e]
        part = (torch.logsumexp(z, 1) - z.gather(1, yy.clamp(min=0)[:, None])[:, 0])[yy >= 0]
        part = part.sum()
        return float(part.detach()), torch.autograd.grad(part, x)[0]

    total, err, norm = 0.0, 0.0, 0.0
    for s in range(0, N, chunk):
        part, gx = truth(s, s + chunk)
        total += part
        err += float((gf[s:s + chunk].double() - gx).square().sum())
        norm += float(gx.square().sum())
    _, gx = truth(N - TAIL, N)  # the tail, row by row
    labelled = y[-TAIL:] >= 0
    row_err = (gf[-TAIL:].double() - gx).norm(dim=1) / gx.norm(dim=1)
    worst = float(row_err[labelled].max())
    loss_err, grad_err = abs(float(loss.detach()) - total) / abs(total), (err / norm) ** 0.5
    print(f"\nN*D = {N * D} (bf16), {int(labelled.sum())} labelled rows past 2^31 elements: "
          f"loss rel err {loss_err:.3g}, feature-gradient rel err {grad_err:.3g}, worst "
          f"labelled tail row {worst:.3g}; fused forward+backward {fused_s:.1f} s")
    assert loss_err <= 1e-4
    assert grad_err <= 1e-2  # bf16 gradient output: about 2^-9 relative
    assert worst <= 1e-2
    assert not gf[-TAIL:][~labelled].any()
