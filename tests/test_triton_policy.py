"""Triton launch policy, checkable without a GPU: the feature-dim limit (a clear error before
any launch), the fp32 dot precision, config pruning by the shared-memory / register
estimates, the autotune key, and the pinned (no-autotune) config."""
import importlib

import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import make_case

pytest.importorskip("mdp_kernels.triton")
from mdp_kernels.triton import _launch  # noqa: E402

MODULES = ("ce_fwd", "ce_bwd", "con_fwd", "con_bwd", "pix_fwd", "pix_bwd", "class_sums",
           "pseudo_label")
KERNELS = [(f"{m}.{n}", k) for m in MODULES
           for n, k in vars(importlib.import_module(f"mdp_kernels.triton.{m}")).items()
           if isinstance(k, _launch.Kernel)]
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@pytest.mark.parametrize("dtype,limit", [(torch.bfloat16, 512), (torch.float16, 512),
                                         (torch.float32, 256), (torch.float64, 128)])
def test_feature_dim_limit(dtype, limit):
    assert _launch.max_dim(dtype) == limit
    assert _launch.block_d(limit, dtype) == limit
    with pytest.raises(ValueError, match=f"feature dims up to {limit}"):
        _launch.block_d(limit + 1, dtype)


def test_large_dim_raises_before_launch():
    device = require("triton", ("ce_fwd", "ce_bwd", "pix_fwd", "class_sums"))
    f, p, y = make_case(1, 600, 5, (2, 3), dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="feature dims up to 512"):
        mk.prototype_contrast_loss(f, p, y, backend="triton")
    with pytest.raises(ValueError, match="feature dims up to 512"):
        mk.masked_average_pool(f, y, 5, backend="triton")
    with pytest.raises(ValueError, match="feature dims up to 512"):
        mk.pixel_contrast_loss(f, y, f, y, num_classes=5, backend="triton")


def test_fp32_precision_policy(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    with mk.config.override(triton_fp32="auto"):
        assert _launch.precision(torch.float32) == "tf32x3"
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
        assert _launch.precision(torch.float32) == "tf32"
    with mk.config.override(triton_fp32="ieee"):
        assert _launch.precision(torch.float32) == "ieee"
        for dt in (torch.bfloat16, torch.float16, torch.float64):
            assert _launch.precision(dt) == "ieee"
    with pytest.raises(ValueError, match="config.triton_fp32 must be one of"):
        mk.config.triton_fp32 = "fp32"


@pytest.mark.parametrize("name,k", KERNELS, ids=[n for n, _ in KERNELS])
def test_every_dtype_has_configs_at_d256_and_max_dim(name, k):
    for dt in DTYPES:
        for d in {min(256, _launch.max_dim(dt)), _launch.max_dim(dt)}:
            bd = _launch.block_d(d, dt)
            fits = k.fitting(bd, dt, limit=_launch.SMEM_SM90)
            assert fits, f"{name}: no config for D = {d} {dt}"
            es, acc = dt.itemsize, _launch.acc_dtype(dt).itemsize
            split = _launch.precision(dt) == "tf32x3"
            for c in fits:
                smem, regs = k.cost(c, bd, es, acc, split)
                assert smem <= _launch.SMEM_SM90 and regs <= _launch.MAX_REGS


@pytest.mark.parametrize("name,k", KERNELS, ids=[n for n, _ in KERNELS])
def test_pruning_drops_what_does_not_fit(name, k):
    assert len(k.configs) <= 8, "a short list per kernel"
    full = k.fitting(256, torch.bfloat16, limit=_launch.SMEM_SM90)
    smem = sorted({k.cost(c, 256, 2, 4)[0] for c in full})
    if len(smem) > 1:  # a tighter limit keeps only the configs under it
        kept = k.fitting(256, torch.bfloat16, limit=smem[0])
        assert 0 < len(kept) < len(full)
        assert all(k.cost(c, 256, 2, 4)[0] <= smem[0] for c in kept)


@pytest.mark.parametrize("name,k", KERNELS, ids=[n for n, _ in KERNELS])
def test_autotune_key_has_sizes_and_flags(name, k):
    names = k.fn.arg_names
    tuned = set(k.interp)
    assert "D" in k.key and ("P" in k.key or "PK" in k.key)
    assert "C" in k.key or "BLOCK_C" not in names
    flags = {n for n in names if n.isupper() and n not in tuned and n not in ("P", "PK", "C",
                                                                              "D")}
    assert flags <= set(k.key), flags - set(k.key)
    assert not tuned & set(k.key)


def test_pinned_config_is_the_first_that_fits():
    k = dict(KERNELS)["ce_fwd._kernel"]
    x = torch.empty(1, dtype=torch.float32)
    first = k.prune(k.configs, {k.fn.arg_names[0]: x}, BLOCK_D=256)[0]
    assert first == k.fitting(256, torch.float32)[0]
    assert k.fitting(256, torch.bfloat16)[0] == k.configs[0]


def test_auto_prefers_triton_over_the_experimental_cuda_backend():
    from mdp_kernels import dispatch
    assert dispatch._auto_order(torch.device("cuda"))[0] == "triton"
