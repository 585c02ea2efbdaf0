"""Shared test helpers: relative errors against the float64 reference."""
import torch

# The library's default ignore_index (as F.cross_entropy's): labels of pixels with no target.
IGNORE = -100

# float32 kernels against the float64 reference: relative error of a loss or a gradient
# (the sums of the pooling op, no exp/log, are held to the tighter SUM_TOL).
TOL = 1e-5
SUM_TOL = 1e-6
# float64 kernels against the float64 reference (only the order of summation differs).
F64_TOL = 1e-10
# Two float32 fused paths of one op (other chunking, or what the forward saves): the same
# maths summed in another order.
PATH_TOL = 1e-6

# Low-precision results may be this many times worse than the eager low-precision reference
# (both measured against float64), plus a small absolute floor.
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 2e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm()
    return float((a - b).norm() / (denom if denom > 0 else 1.0))


def unit(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=dim)


def make_case(b, d, c, hw, *, ignore_frac=0.2, dtype=torch.float32, device="cpu",
              normalize=True, seed=None):
    """Random features (B, D, H, W), prototypes (C, D) and labels with ignored pixels."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    h, w = hw
    f = torch.randn(b, d, h, w, generator=g, dtype=torch.float64)
    p = torch.randn(c, d, generator=g, dtype=torch.float64)
    if normalize:
        f, p = unit(f), unit(p)
    y = torch.randint(0, c, (b, h, w), generator=g)
    y[torch.rand(b, h, w, generator=g) < ignore_frac] = IGNORE
    return f.to(dtype).to(device), p.to(dtype).to(device), y.to(device)


def check_low_precision(fused, eager, truth, dtype, what=""):
    e_fused, e_eager = rel_err(fused, truth), rel_err(eager, truth)
    bound = LOW_PRECISION_FACTOR * e_eager + LOW_PRECISION_FLOOR[dtype]
    assert e_fused <= bound, f"{what}: fused error {e_fused:.3g} > {bound:.3g} (eager {e_eager:.3g})"


def loss_and_grads(fn, *inputs):
    """``(loss, *grads)`` of ``fn`` at fresh leaf copies of ``inputs``. An unreduced loss is
    weighted by ``linspace(0.5, 1.5)`` first, so that no two pixels' gradients coincide."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*leaves)
    total = loss if loss.dim() == 0 else (loss.reshape(-1) * torch.linspace(
        0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)).sum()
    return (loss.detach(), *torch.autograd.grad(total, leaves))
