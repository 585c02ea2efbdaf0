"""Every bad input raises the documented Python exception, naming the problem."""
import pytest
import torch

import mdp_kernels as mk
from helpers import IGNORE, make_case

BACKENDS = ["reference", "auto"]


@pytest.fixture
def case():
    return make_case(2, 8, 5, (3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [5, 7, -1, 254])
def test_label_out_of_range_names_value(case, backend, bad):
    f, p, y = case
    y[1, 2, 3] = bad
    with pytest.raises(ValueError, match=f"label value {bad} "):
        mk.prototype_contrast_loss(f, p, y, backend=backend)
    with pytest.raises(ValueError, match=f"label value {bad} "):
        mk.masked_average_pool(f, y, 5, backend=backend)
    with pytest.raises(ValueError, match=f"label value {bad} "):
        mk.prototype_contrast_loss(f, p, torch.zeros_like(y), labels_b=y, lam=0.5, backend=backend)


def test_custom_ignore_index(case):
    f, p, y = case  # C = 5: 255 is not a class, so it may mark ignored pixels
    loss = mk.prototype_contrast_loss(f, p, torch.where(y == IGNORE, 255, y), ignore_index=255)
    torch.testing.assert_close(loss, mk.prototype_contrast_loss(f, p, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_dtype_device_mismatches(case, backend):
    f, p, y = case
    with pytest.raises(ValueError, match="labels must have shape"):
        mk.prototype_contrast_loss(f, p, y[:, :2], backend=backend)
    with pytest.raises(ValueError, match="prototypes must be"):
        mk.prototype_contrast_loss(f, p[:, :4], y, backend=backend)
    with pytest.raises(TypeError, match="prototypes is torch.float64"):
        mk.prototype_contrast_loss(f, p.double(), y, backend=backend)
    with pytest.raises(TypeError, match="integer tensor"):
        mk.prototype_contrast_loss(f, p, y.float(), backend=backend)
    with pytest.raises(TypeError, match="float32, bfloat16"):
        mk.prototype_contrast_loss(f.int(), p, y, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        mk.prototype_contrast_loss(f, p, y, reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="tau"):
        mk.prototype_contrast_loss(f, p, y, tau=0.0, backend=backend)
    with pytest.raises(ValueError, match="class_mask must have shape"):
        mk.prototype_contrast_loss(f, p, y, class_mask=torch.ones(4, dtype=torch.bool),
                                   backend=backend)
    with pytest.raises(ValueError, match="same"):
        mk.prototype_consistency_loss(f, f[:, :, :2], p, backend=backend)
    with pytest.raises(ValueError, match="kind"):
        mk.prototype_consistency_loss(f, f, p, kind="js", backend=backend)
    with pytest.raises(ValueError, match="mask must have shape"):
        mk.prototype_consistency_loss(f, f, p, mask=torch.ones(2, 3, dtype=torch.bool),
                                      backend=backend)
    with pytest.raises(ValueError, match="meta"):
        mk.prototype_contrast_loss(f, p.to("meta"), y, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lam(case, backend):
    f, p, y = case
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\], got 1.5"):
        mk.prototype_contrast_loss(f, p, y, labels_b=y, lam=1.5, backend=backend)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\], got -0.25"):
        mk.prototype_contrast_loss(f, p, y, labels_b=y, lam=torch.tensor([0.5, -0.25]),
                                   backend=backend)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        mk.prototype_contrast_loss(f, p, y, labels_b=y, lam=torch.tensor([0.5, 0.2, 0.1]),
                                   backend=backend)
    with pytest.raises(ValueError, match="both labels_b and lam"):
        mk.prototype_contrast_loss(f, p, y, labels_b=y, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_features(case, backend):
    f, p, y = case
    f[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="feats contains NaN"):
        mk.prototype_contrast_loss(f, p, y, backend=backend)
    p2 = p.clone()
    p2[1, 1] = float("inf")
    with pytest.raises(ValueError, match="prototypes contains NaN"):
        mk.prototype_contrast_loss(f.nan_to_num(), p2, y, backend=backend)
    with pytest.raises(ValueError, match="student contains NaN"):
        mk.prototype_consistency_loss(f, f.nan_to_num(), p, backend=backend)
    # opting out skips the check (the result is then NaN, as the inputs are)
    out = mk.prototype_contrast_loss(f, p, y, check_finite=False, backend=backend)
    assert torch.isnan(out)


def test_unknown_and_unavailable_backend(case):
    f, p, y = case
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.prototype_contrast_loss(f, p, y, backend="mps")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: "):
        mk.prototype_contrast_loss(f, p, y, backend="cuda")
