"""Triton-specific checks: block-size / chunking invariance, strided views, atomic vs
deterministic prototype gradients, the interpreter's single autotune config.

Shapes are small: without a GPU these run in the Triton interpreter.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import IGNORE, make_case, rel_err, unit

tk = pytest.importorskip("mdp_kernels.triton")
from mdp_kernels.triton import _launch  # noqa: E402

ALL = ("ce_fwd", "ce_bwd", "con_fwd", "con_bwd", "pix_fwd", "pix_bwd", "class_sums",
       "class_sums_bwd", "pseudo_label")
SMALL = dict(BLOCK_P=16, BLOCK_C=16, BLOCK_Q=16, BLOCK_K=32, CHUNKS=3)


@pytest.fixture
def device():
    return require("triton", ALL)


def grads(loss, *xs):
    return [loss.detach()] + list(torch.autograd.grad(loss, xs))


def run_all(f, g, p, y, yb, cm, backend):
    """Every op with mixing, masks and class masks: a list of outputs and gradients."""
    f = f.detach().clone().requires_grad_()
    p = p.detach().clone().requires_grad_()
    out = grads(mk.prototype_contrast_loss(f, p, y, tau=0.2, labels_b=yb, lam=0.3,
                                           class_mask=cm, backend=backend), f, p)
    out += grads(mk.prototype_consistency_loss(f, g, p, kind="kl", class_mask=cm,
                                               mask=y != IGNORE, backend=backend), f, p)
    out += grads(mk.pixel_contrast_loss(f, y, g.requires_grad_(), yb, num_classes=p.shape[0],
                                        tau=0.3, backend=backend), f, g)
    means, _ = mk.masked_average_pool(f, y, p.shape[0], backend=backend)
    out += grads((means * torch.arange(means.numel()).view(means.shape).to(means)).sum(), f)
    out += list(mk.pseudo_label(f, p, threshold=0.2, class_mask=cm, backend=backend))
    return out


def case(device, c=37, hw=(7, 9)):
    f, p, y = make_case(2, 20, c, hw)
    g = unit(f + 0.3 * torch.randn_like(f))
    yb = torch.randint(0, c, y.shape)
    yb[0, :3] = IGNORE
    cm = torch.rand(c) > 0.25
    return [x.to(device) for x in (f, g, p, y, yb, cm)]


def close(a, b, tol=1e-5):
    for i, (x, z) in enumerate(zip(a, b)):
        if x.is_floating_point():
            assert rel_err(x.cpu(), z.cpu()) <= tol, f"output {i}: {rel_err(x.cpu(), z.cpu()):.3g}"
        else:
            assert torch.equal(x.cpu(), z.cpu()), f"output {i}"


@pytest.mark.parametrize("meta", [SMALL, dict(BLOCK_P=32, BLOCK_C=64, BLOCK_Q=64, BLOCK_K=16,
                                              CHUNKS=2)])
def test_block_sizes_and_chunks_match_reference(device, meta):
    f, g, p, y, yb, cm = case(device)
    with mk.config.override(triton_meta=meta):
        got = run_all(f, g, p, y, yb, cm, "triton")
    ref = run_all(*(x.double() if x.is_floating_point() else x for x in (f, g, p)), y, yb, cm,
                  "reference")
    close(got[:-2], ref[:-2])
    labels, scores = got[-2:]
    assert rel_err(scores.cpu(), ref[-1].cpu()) <= 1e-6
    assert torch.equal(labels.cpu(), ref[-2].cpu())


def test_sliced_views(device):
    """Views with a feature stride != P and a pixel stride != 1 (crops of a larger map)."""
    big_f, big_p, big_y = make_case(2, 40, 23, (12, 15))
    f = big_f[:, ::2, 1:10, 2::2]  # (2, 20, 9, 7), non-contiguous in every dim
    g = unit(f + 0.3 * torch.randn_like(f))
    p = unit(big_p[:, :20].contiguous())
    y = big_y[:, 1:10, 2::2]
    yb = torch.randint(0, 23, y.shape)
    cm = torch.ones(23, dtype=torch.bool)
    assert not f.is_contiguous()
    with mk.config.override(triton_meta=SMALL):
        got = run_all(*(x.to(device) for x in (f, g, p, y, yb, cm)), "triton")
    ref = run_all(f.double(), g.double(), p.double(), y, yb, cm, "reference")
    close(got[:-2], ref[:-2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_atomic_dprotos_matches_deterministic(device, dtype):
    f, g, p, y, yb, cm = (x.to(dtype) if x.is_floating_point() else x for x in case(device))
    p.requires_grad_()
    outs = []
    for det in (True, False):
        with mk.config.override(deterministic=det, triton_meta=SMALL):
            a = mk.prototype_contrast_loss(f, p, y, labels_b=yb, lam=0.6, class_mask=cm,
                                           backend="triton")
            b = mk.prototype_consistency_loss(f, g, p, class_mask=cm, backend="triton")
            outs.append(torch.autograd.grad(a, p) + torch.autograd.grad(b, p))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for x, z in zip(*outs):
        assert rel_err(x.float(), z.float()) <= tol


def test_deterministic_dprotos_bitwise_across_runs(device):
    f, g, p, y, yb, cm = case(device)
    p.requires_grad_()
    with mk.config.override(triton_meta=SMALL):
        runs = [torch.autograd.grad(mk.prototype_contrast_loss(f, p, y, backend="triton"), p)[0]
                for _ in range(2)]
    assert torch.equal(*runs)


def test_interpreter_uses_one_config():
    if not _launch.INTERPRET:
        pytest.skip("only the interpreter pins a single config")
    mods = ("ce_fwd", "ce_bwd", "con_fwd", "con_bwd", "pix_fwd", "pix_bwd", "class_sums",
            "pseudo_label")
    kernels = [k for m in mods for k in vars(importlib.import_module(f"mdp_kernels.triton.{m}"))
               .values() if isinstance(k, _launch.Kernel)]
    assert len(kernels) == 12
    assert all(len(k.tuned.configs) == 1 for k in kernels)


def test_skipped_pixels_get_zero_and_are_not_read(device):
    """Pixels without a target are masked out of the loads: NaN features there are unseen."""
    f, p, y = make_case(1, 16, 19, (5, 40))
    y[:, :, :20] = IGNORE  # the first 100 pixels: several whole blocks without a target
    f[:, :, y[0] == IGNORE] = float("nan")
    f, p, y = f.to(device), p.to(device), y.to(device)
    f.requires_grad_()
    with mk.config.override(triton_meta=SMALL):
        loss = mk.prototype_contrast_loss(f, p, y, reduction="none", check_finite=False,
                                          backend="triton")
        (gf,) = torch.autograd.grad(loss.sum(), f)
    ref = mk.prototype_contrast_loss(f.detach().nan_to_num(0.0).double(), p.double(), y.cpu(),
                                     reduction="none", backend="reference")
    assert torch.isfinite(loss).all() and torch.isfinite(gf).all()
    assert rel_err(loss.detach().cpu(), ref) <= 1e-5
    assert not gf[..., :20].any()



def test_inside_torch_compile(device):
    """The triton ops run inside a fullgraph torch.compile graph and match eager mode."""
    f, g, p, y, yb, cm = case(device, c=11, hw=(4, 5))
    f.requires_grad_()
    p.requires_grad_()

    def fn(f, p):
        return (mk.prototype_contrast_loss(f, p, y, labels_b=yb, lam=0.4, class_mask=cm,
                                           backend="triton")
                + mk.prototype_consistency_loss(f, g, p, backend="triton")
                + mk.pixel_contrast_loss(f, y, g, yb, num_classes=11, backend="triton")
                + mk.masked_average_pool(f, y, 11, backend="triton")[0].square().sum())

    torch._dynamo.reset()
    comp = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager, got = fn(f, p), comp(f, p)
    torch.testing.assert_close(got, eager)
    for a, b in zip(torch.autograd.grad(got, (f, p)), torch.autograd.grad(eager, (f, p))):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(os.environ.get("MDP_TRITON_COMPILE_CHECK") != "1",
                    reason="compiling every config for sm_90 takes minutes; set "
                           "MDP_TRITON_COMPILE_CHECK=1 (in a Triton 3.6 env, see the script)")
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "fp64"])
def test_kernels_compile_for_sm90(dtype):
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, script, "-j", "2", dtype], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
