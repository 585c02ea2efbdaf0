"""Every loss through every kernel backend that runs here, on small odd shapes (D, C, H, W
not multiples of any block size, ignored pixels, masked classes, strided views), against the
float64 reference. ``make gpu-check`` runs it under ``compute-sanitizer --tool memcheck``
on a GPU (an out-of-bounds access fails it even when the values come out right), and
through the Triton interpreter and the cpu backend without one.

    python tools/odd_shapes.py [--device cuda|cpu]      # exit 1 on any mismatch
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IGNORE = -100  # the ops' default ignore_index
# fp32 within the kernels' 1e-5 contract; bf16 within a few bf16 roundings of the truth.
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def losses(f, g, p, y, yb, cm, backend):
    """{op: [loss value, gradients...]} for every op ``backend`` has kernels for."""
    import mdp_kernels as mk
    f = f.detach().clone().requires_grad_()
    p = p.detach().clone().requires_grad_()
    k = g.detach().clone().requires_grad_()
    ops = {
        "ce": (lambda: mk.prototype_contrast_loss(f, p, y, tau=0.2, labels_b=yb, lam=0.3,
                                                  class_mask=cm, backend=backend), (f, p)),
        "consistency": (lambda: mk.prototype_consistency_loss(
            f, g, p, class_mask=cm, mask=y != IGNORE, backend=backend), (f, p)),
        "pixel": (lambda: mk.pixel_contrast_loss(f, y, k, yb, num_classes=p.shape[0], tau=0.3,
                                                 backend=backend), (f, k)),
        "pool": (lambda: mk.masked_average_pool(f, y, p.shape[0],
                                                backend=backend)[0].square().sum(), (f,)),
        "pseudo": (lambda: mk.pseudo_label(f, p, threshold=0.2, class_mask=cm,
                                           backend=backend)[1], ()),
    }
    out = {}
    for name, (fn, wrt) in ops.items():
        try:
            val = fn()
        except RuntimeError as exc:  # the cuda backend has no consistency/pixel kernels
            if "unavailable" not in str(exc):
                raise
            continue
        out[name] = [val.detach()] + (list(torch.autograd.grad(val, wrt)) if wrt else [])
    return out


def inputs(dtype, device, c=37, d=19, hw=(7, 9)):
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(2, 2 * d, hw[0] + 1, hw[1] + 2, generator=gen, dtype=torch.float64)
    f = torch.nn.functional.normalize(big[:, ::2, 1:, 2:], dim=1)  # strided in every dim
    g = torch.nn.functional.normalize(f + 0.3 * torch.randn(f.shape, generator=gen,
                                                            dtype=torch.float64), dim=1)
    p = torch.nn.functional.normalize(torch.randn(c, d, generator=gen, dtype=torch.float64),
                                      dim=1)
    y = torch.randint(0, c, (2, *hw), generator=gen)
    y[torch.rand(y.shape, generator=gen) < 0.2] = IGNORE
    yb = torch.randint(0, c, y.shape, generator=gen)
    cm = torch.rand(c, generator=gen) > 0.25
    return ([x.to(dtype).to(device) for x in (f, g, p)] + [x.to(device) for x in (y, yb, cm)],
            [f, g, p, y, yb, cm])


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import mdp_kernels as mk
    device = torch.device(a.device)
    backends = [b for b in mk.available_backends(device) if b != "reference"]
    print(f"odd shapes on {device}: backends {backends}", flush=True)
    bad = 0
    for dtype, tol in TOL.items():
        x, x64 = inputs(dtype, device)
        ref = losses(*x64, "reference")
        for be in backends:
            got = losses(*x, be)
            if device.type == "cuda":
                torch.cuda.synchronize()
            for op, outs in got.items():
                err = max(rel(u, v) for u, v in zip(outs, ref[op]))
                bad += err > tol
                print(f"{'ok  ' if err <= tol else 'FAIL'} {be} {op} {dtype}: max rel err "
                      f"{err:.2e} (tol {tol:g}) over {len(outs)} outputs", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
