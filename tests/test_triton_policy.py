"""Triton launch policy, checkable without a GPU: the feature-dim limit (a clear error before
any launch), the fp32 dot precision, config pruning by the shared-memory / register
estimates, the autotune key, the pinned (no-autotune) config, and the launch paths a GPU
takes (pinned launcher, multi-config autotuner) run once through the interpreter; the
int32 masks and targets every launch gets."""
import importlib

import pytest
import torch
import triton

import mdp_kernels as mk
from conftest import require
from helpers import make_case
from test_triton_kernels import ALL, case, close, run_all

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
    # the D and P strides of every (B, D, P) operand: NCHW and channels-last tune apart
    layout = {n for n in names if n[0] == "s" and len(n) == 3 and n[2] in "dp"}
    assert layout and layout <= set(k.key), layout - set(k.key)


def test_pinned_config_is_the_first_that_fits():
    k = dict(KERNELS)["ce_fwd._kernel"]
    x = torch.empty(1, dtype=torch.float32)
    first = k.prune(k.configs, {k.fn.arg_names[0]: x}, BLOCK_D=256)[0]
    assert first == k.fitting(256, torch.float32)[0]
    assert k.fitting(256, torch.bfloat16)[0] == k.configs[0]


def test_auto_prefers_triton_over_the_experimental_cuda_backend():
    from mdp_kernels import dispatch
    assert dispatch._auto_order(torch.device("cuda"))[0] == "triton"


def _record(monkeypatch) -> list[tuple[str, dict]]:
    """(kernel name, {argument: value}) of every Triton launch from now on."""
    calls = []
    getitem = _launch.Kernel.__getitem__

    def spy(self, grid):
        launch = getitem(self, grid)

        def run(*args, **kw):
            calls.append((self.fn.__name__, dict(zip(self.fn.arg_names, args), **kw)))
            return launch(*args, **kw)
        return run
    monkeypatch.setattr(_launch.Kernel, "__getitem__", spy)
    return calls


# Triton 3.6 fails to lower fp64 tl.dot fed by int8/bool masks or int64 targets (issue 18):
# these reach every kernel as int32 (the flag, when there is one, that makes them used).
INT32_ARGS = {"ta_ptr": None, "tb_ptr": "HAS_TB", "mask_ptr": "HAS_MASK", "qm_ptr": None,
              "km_ptr": None}


def test_masks_and_targets_reach_the_kernels_as_int32(monkeypatch):
    device = require("triton", ALL)
    calls = _record(monkeypatch)
    f, g, p, y, yb, cm = (x.double() if x.is_floating_point() else x for x in case(device))
    run_all(f, g, p, y, yb, cm, "triton")
    checked = set()
    for name, args in calls:
        for arg, flag in INT32_ARGS.items():
            if arg in args and (flag is None or args[flag]):
                assert args[arg].dtype == torch.int32, (name, arg, args[arg].dtype)
                checked.add((name, arg))
    assert checked == {(k, a) for k in ("_ce_fwd", "_ce_bwd_feats", "_ce_bwd_protos")
                       for a in ("ta_ptr", "tb_ptr")} | {
        (k, "mask_ptr") for k in ("_con_fwd", "_con_bwd_feats", "_con_bwd_protos")} | {
        (k, a) for k in ("_pix_fwd", "_pix_bwd_q", "_pix_bwd_k") for a in ("qm_ptr", "km_ptr")}


def test_pinned_launcher_runs_every_kernel(monkeypatch):
    """The GPU's no-autotune path (``config.triton_autotune = False``): each kernel launches
    its first config that fits, block sizes and warps included, and matches the reference."""
    device = require("triton", ALL)
    monkeypatch.setattr(_launch, "INTERPRET", False)  # the interpreter takes the real configs
    chosen = {}
    prune = _launch.Kernel.prune

    def spy(self, configs, named_args, **kw):
        keep = prune(self, configs, named_args, **kw)
        chosen[self.fn.__name__] = (keep[0], self.fitting(kw["BLOCK_D"],
                                                          named_args[self.fn.arg_names[0]].dtype))
        return keep
    monkeypatch.setattr(_launch.Kernel, "prune", spy)
    f, g, p, y, yb, cm = case(device)
    with mk.config.override(triton_autotune=False):
        got = run_all(f, g, p, y, yb, cm, "triton")
    assert set(chosen) == {k.fn.__name__ for _, k in KERNELS}
    assert all(first == fits[0] for first, fits in chosen.values())
    ref = run_all(*(x.double() if x.is_floating_point() else x for x in (f, g, p)), y, yb, cm,
                  "reference")
    close(got[:-2], ref[:-2])
    assert torch.equal(got[-2].cpu(), ref[-2].cpu())


def test_multi_config_autotuner_prunes_then_tunes_per_layout(monkeypatch):
    """A GPU's ``triton.autotune`` over the whole list: the prune hook runs inside it with
    the launch's arguments, only the survivors are benchmarked (timings faked: the
    interpreter has none), and a channels-last input is tuned apart from NCHW."""
    from triton.runtime import autotuner
    device = require("triton", ("ce_fwd",))
    k = dict(KERNELS)["ce_fwd._kernel"]
    bd, dt = 32, torch.float32
    costs = sorted({k.cost(c, bd, 4, 4, True)[0] for c in k.configs})
    assert len(costs) >= 3
    monkeypatch.setattr(_launch, "smem_limit", lambda: costs[1])  # some fit, not all
    want = k.fitting(bd, dt)
    # exactly the configs within the lowered limit (and the register budget), in list order
    assert want == [c for c in k.configs if k.cost(c, bd, 4, 4, True)[0] <= costs[1]
                    and k.cost(c, bd, 4, 4, True)[1] <= _launch.MAX_REGS]
    assert len(want) >= 2  # so the autotuner below has a choice to make
    monkeypatch.setattr(k, "tuned", triton.autotune(
        k.configs, key=k.key, prune_configs_by={"early_config_prune": k.prune})(k.fn))
    monkeypatch.setattr(_launch, "INTERPRET", False)
    benched = []

    def bench(self, *args, config, **kw):
        benched.append(config)
        return [float(len(benched))]  # the first one tried wins
    monkeypatch.setattr(autotuner.Autotuner, "_bench", bench)
    f, p, y = make_case(2, bd, 7, (4, 5), dtype=dt, device=device)
    ref = mk.prototype_contrast_loss(f.double(), p.double(), y, backend="reference")
    with mk.config.override(triton_autotune=True):
        got = mk.prototype_contrast_loss(f, p, y, backend="triton")
        assert benched == want
        assert k.tuned.best_config == want[0]
        mk.prototype_contrast_loss(f, p, y, backend="triton")
        assert len(benched) == len(want)  # cached for this key
        cl = f.contiguous(memory_format=torch.channels_last)
        got_cl = mk.prototype_contrast_loss(cl, p, y, backend="triton")
        assert benched == want + want
    close([got, got_cl], [ref, ref])
