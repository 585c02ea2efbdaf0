"""Property-based fuzzing of every op and gradient against the float64 reference.

cpu backend over wide shapes, with chunk sizes drawn small enough (``cpu_tile_rows``,
``cpu_pix_cols``) that the kernels' multi-chunk and tail-chunk paths run; triton (through
the interpreter on CPU) over small ones. Fixed seed (``derandomize``) and example budgets,
so CI is repeatable and bounded.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import mdp_kernels as mk
from conftest import require
from helpers import IGNORE, LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, unit

LOW = tuple(LOW_PRECISION_FLOOR)  # bf16, fp16: judged against the eager reference's error

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
LAYOUTS = ("contiguous", "channels_last", "pixels_by_dim", "step_sliced", "expanded")


def fuzz(examples):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def layout(x64: torch.Tensor, how: str, dtype) -> torch.Tensor:
    """``x64`` (B, D, H, W) in ``dtype`` and memory layout ``how``; same values. For
    ``pixels_by_dim`` the result is (N, D) (B = 1), a transposed view of a (D, N) tensor."""
    x = x64.to(dtype)
    if how == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if how == "pixels_by_dim":
        return x[0].flatten(1).contiguous().t()
    if how == "step_sliced":
        big = torch.zeros(*x.shape[:2], 2 * x.shape[2], 3 * x.shape[3], dtype=dtype)
        big[:, :, ::2, ::3] = x
        return big[:, :, ::2, ::3]
    if how == "expanded":  # every column the same: a stride-0 view
        return x[..., :1].expand(x.shape)
    return x.contiguous()


def labels_for(shape, c, ignore_frac, g, how):
    y = torch.randint(0, c, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = IGNORE
    if how == "pixels_by_dim":
        return y[0].flatten()
    if how == "expanded":
        return y[..., :1].expand(shape).contiguous()
    return y


@st.composite
def cases(draw, max_c, max_hw, max_d):
    b = draw(st.integers(1, 3))
    d = draw(st.sampled_from([d for d in (1, 2, 3, 5, 8, 13, 16, 31, 64) if d <= max_d]))
    h, w = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    c = draw(st.integers(1, max_c))
    how = draw(st.sampled_from(LAYOUTS))
    if how == "pixels_by_dim":
        b = 1
    return dict(b=b, d=d, hw=(h, w), c=c, how=how, seed=draw(st.integers(0, 2**31 - 1)),
                ignore=draw(st.sampled_from([0.0, 0.2, 0.7, 1.0])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, *LOW])),
                mask=draw(st.sampled_from([None, 0.5, 0.95])),
                per_image_mask=draw(st.booleans()),  # a (B, C) class mask, else (C,)
                tile=draw(st.sampled_from([None, 16, 48])),  # cpu pixels per chunk
                cols=draw(st.sampled_from([None, 7])),  # cpu key pixels per block
                mix=draw(st.sampled_from([None, "scalar", "per_image"])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                tau=draw(st.sampled_from([0.05, 0.3, 1.0])))


def build(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, d, (h, w), c = case["b"], case["d"], case["hw"], case["c"]
    f = unit(torch.randn(b, d, h, w, generator=g, dtype=torch.float64))
    p = unit(torch.randn(c, d, generator=g, dtype=torch.float64))
    y = labels_for((b, h, w), c, case["ignore"], g, case["how"])
    yb = labels_for((b, h, w), c, case["ignore"], g, case["how"])
    mshape = (b, c) if case["per_image_mask"] else (c,)
    cm = None if case["mask"] is None else torch.rand(mshape, generator=g) < case["mask"]
    lam = {None: None, "scalar": 0.37,
           "per_image": torch.rand(b, generator=g, dtype=torch.float64)}[case["mix"]]
    return f, p, y, yb, cm, lam


def run(fn, f, p, backend, dtype, how):
    """Loss (weighted when unreduced) and gradients w.r.t. features and prototypes."""
    leaf = layout(f, "contiguous", dtype).requires_grad_() if how == "expanded" else None
    ff = leaf[..., :1].expand(leaf.shape) if leaf is not None else layout(f, how, dtype)
    if leaf is None:
        ff.requires_grad_()
    pp = p.to(dtype).requires_grad_()
    out = fn(ff, pp, backend)
    total = out.sum() if out.dim() == 0 else (out * torch.linspace(
        0.5, 1.5, out.numel(), dtype=out.dtype).view(out.shape)).sum()
    gf, gp = torch.autograd.grad(total, (leaf if leaf is not None else ff, pp))
    return [out.detach(), gf, gp]


def check(make, case, backend):
    """Fused against the float64 truth: relative error ``TOL`` (float32/64) or at most
    ``LOW_PRECISION_FACTOR`` x the eager low-precision error (bf16, fp16), plus an absolute floor
    for the terms that cancel: a pixel's gradient is a difference of vectors of size
    ``w / tau`` (``w`` its weight in the reduction) whose coefficients carry a few roundings
    of logits as large as ``1 / tau`` (the teacher's 1 / 0.04 in the consistency), so a
    truth near 0 (e.g. one class, or one key) is judged against that scale, not against 0."""
    f, p = build(case)[:2]
    dtype, how, fn = case["dtype"], case["how"], make(case)
    got = run(fn, f, p, backend, dtype, how)
    truth = run(fn, f, p, "reference", torch.float64, how)
    eager = run(fn, f, p, "reference", dtype, how) if dtype in LOW else None
    w = 1.5
    if case["reduction"] == "mean":  # weight of one pixel: mean / sum of the truth
        total = run(make(dict(case, reduction="sum")), f, p, "reference", torch.float64,
                    how)[0]
        w = float(truth[0].abs() / total.abs()) if total != 0 else 1.0
    for i, name in enumerate(("loss", "dfeats", "dprotos")):
        a, t = got[i].double(), truth[i]
        logit = 1 / min(case["tau"], 0.04)
        atol = 4 * torch.finfo(dtype).eps * logit * w / case["tau"] * t.numel() ** 0.5
        err = float((a - t).norm())
        if eager is None:
            bound = TOL[dtype] * float(t.norm()) + atol
        else:
            bound = (LOW_PRECISION_FACTOR * float((eager[i].double() - t).norm())
                     + LOW_PRECISION_FLOOR[dtype] * float(t.norm()) + atol)
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} {case}"


def ce_fn(case):
    _, _, y, yb, cm, lam = build(case)
    mix = {} if lam is None else dict(labels_b=yb, lam=lam if not torch.is_tensor(lam)
                                      else lam.float())
    return lambda f, p, be: mk.prototype_contrast_loss(
        f, p, y, tau=case["tau"], class_mask=cm, reduction=case["reduction"], backend=be,
        **mix)


def con_fn(case):
    f, _, y, _, cm, _ = build(case)
    g = torch.Generator().manual_seed(case["seed"] + 1)  # the same teacher on every call
    teacher = unit(f + 0.3 * torch.randn(f.shape, generator=g, dtype=f.dtype))
    mask = None if case["mix"] is None else torch.rand(y.shape, generator=g) < 0.6
    kind = "kl" if case["mix"] == "scalar" else "ce"

    def fn(s, p, be):
        t = layout(teacher, case["how"], s.dtype)
        return mk.prototype_consistency_loss(s, t, p, tau_student=case["tau"], mask=mask,
                                             class_mask=cm, kind=kind,
                                             reduction=case["reduction"], backend=be)
    return fn


def pix_fn(case):
    f, _, y, yb, _, _ = build(case)
    c = case["c"]

    def fn(q, p, be):  # key view: the prototypes' magnitudes are irrelevant; mix in p
        k = (q * 0.5 + 0.1).detach() if q.dim() == 2 else q.flip(-1).detach()
        return (mk.pixel_contrast_loss(q, y, k, yb, tau=case["tau"], num_classes=c,
                                       reduction=case["reduction"], backend=be)
                + 0.0 * p.sum())
    return fn


def pool_fn(case):
    _, _, y, _, _, _ = build(case)
    w = torch.linspace(-1, 1, case["c"] * case["d"], dtype=torch.float64)

    def fn(f, p, be):
        sums, counts = mk.class_embedding_sums(f, y, case["c"], backend=be)
        weighted = (sums * w.view(case["c"], case["d"]).to(sums.dtype)).sum()
        return weighted + counts.sum() + 0.0 * p.sum()
    return fn


OPS = {"ce": (ce_fn, ("ce_fwd", "ce_bwd")), "con": (con_fn, ("con_fwd", "con_bwd")),
       "pix": (pix_fn, ("pix_fwd", "pix_bwd")),
       "pool": (pool_fn, ("class_sums", "class_sums_bwd"))}


@pytest.mark.parametrize("op", OPS)
@fuzz(100)
@given(case=cases(max_c=1100, max_hw=9, max_d=64))
def test_cpu_matches_reference(op, case):
    require("cpu", OPS[op][1])
    if op == "pix" and case["c"] > 40:
        case = dict(case, c=case["c"] % 40 + 1)
    with mk.config.override(cpu_tile_rows=case["tile"], cpu_pix_cols=case["cols"]):
        check(OPS[op][0], case, "cpu")


@pytest.mark.parametrize("op", OPS)
@fuzz(12)
@given(case=cases(max_c=40, max_hw=5, max_d=16))
def test_triton_matches_reference(op, case):
    require("triton", OPS[op][1])
    check(OPS[op][0], case, "triton")


def check_pseudo_label(case, threshold, backend):
    f, p, _, _, cm, _ = build(case)
    if cm is not None:  # every image may choose some class
        cm[..., 0] |= ~cm.any(-1)
    x = layout(f, case["how"], case["dtype"])
    pt = p.to(case["dtype"])
    with mk.config.override(cpu_tile_rows=case["tile"]):
        labels, scores = mk.pseudo_label(x, pt, threshold=threshold, class_mask=cm,
                                         backend=backend)
    ref_l, ref_s = mk.pseudo_label(x, pt, threshold=threshold, class_mask=cm,
                                   backend="reference")
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(case["dtype"], 1e-5)
    torch.testing.assert_close(scores, ref_s, rtol=tol, atol=tol)
    clear = (ref_s - threshold).abs() > tol  # not a borderline score
    agree = (labels == ref_l) | ~clear
    if case["dtype"] not in LOW:  # low-precision near-ties may pick another argmax
        assert bool(agree.all()), case


THRESHOLDS = st.sampled_from([-1.0, 0.0, 0.3])


@fuzz(80)
@given(case=cases(max_c=1100, max_hw=9, max_d=64), threshold=THRESHOLDS)
def test_pseudo_label_matches_reference(case, threshold):
    require("cpu", ("pseudo_label",))
    check_pseudo_label(case, threshold, "cpu")


@fuzz(12)
@given(case=cases(max_c=40, max_hw=5, max_d=16), threshold=THRESHOLDS)
def test_triton_pseudo_label_matches_reference(case, threshold):
    require("triton", ("pseudo_label",))
    check_pseudo_label(case, threshold, "triton")
