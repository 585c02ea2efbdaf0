"""What is benchmarked: the ops, their inputs, every implementation that can run them, and
the floor (the bare matrix products, or a copy, that any implementation must do).

Shared by the pytest-benchmark suite (``benchmarks/test_ops.py``), the runner
(``benchmarks/run.py``) and the fresh-process memory probe (``benchmarks/memprobe.py``), so
all three time exactly the same work.

Implementations (``impl``): ``eager``, the idiomatic PyTorch a user would write instead
(``F.cross_entropy`` on einsum logits; soft-target ``F.cross_entropy`` for consistency;
for the pixel loss, pooling and pseudo-labels the reference, which is already that), and
``compile`` (``torch.compile`` of it): the baselines of the ratios; ``reference``
(``backend="reference"``, the project's ground truth, with its masking); a kernel backend
from ``dispatch`` (``cpu``, ``triton``, ``cuda``: picked up as soon as it registers the
op's kernel phases); and for the class loss the linear-cross-entropy competitors ``lce``
(``torch.nn.functional.linear_cross_entropy``, chunked), ``liger`` (Liger-Kernel) and
``cce`` (Cut Cross-Entropy) when importable.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

import mdp_kernels as mk
from mdp_kernels import dispatch

IGNORE = -1  # not 255: C = 342 or 2048 makes 255 a real class
TAU = 0.07
OPS = ("ce", "consistency", "pixel", "pool", "pseudo")
KERNELS = ("cpu", "triton", "cuda")
COMPETITORS = ("compile", "lce", "liger", "cce")
IMPLS = ("eager", "reference") + KERNELS + COMPETITORS
# Kernel phases each op needs from a backend (see the contract in mdp_kernels.dispatch).
PHASES = {
    "ce": ("ce_fwd", "ce_bwd"),
    "consistency": ("con_fwd", "con_bwd"),
    "pixel": ("pix_fwd", "pix_bwd", "class_sums", "class_sums_bwd"),
    "pool": ("class_sums", "class_sums_bwd"),
    "pseudo": ("pseudo_label",),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Op options (``Case.option``): "" plain; for ce "weight" (F.cross_entropy's), "smoothing"
# (label_smoothing=0.1), "mask" (a (C,) class mask, 20% of classes off), "mask_bc" (a
# (B, C) mask, 20% off per image); for ce, consistency and pixel "normalize" (unnormalised
# features, normalize=True; the baselines call F.normalize first) and "prenorm" (the same
# with F.normalize then the plain fused op: what normalize=True replaces); for ce and
# consistency "memory_low" (memory="low": nothing feature-sized kept for the backward).
OPTIONS = {"ce": ("", "weight", "smoothing", "mask", "mask_bc", "normalize", "prenorm",
                  "memory_low"),
           "consistency": ("", "normalize", "prenorm", "memory_low"),
           "pixel": ("", "normalize", "prenorm")}
NORM_KEYS = ("f", "t", "k")  # the inputs that normalize / prenorm normalise
SMOOTHING = 0.1


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    ``ce``, ``consistency``, ``pseudo``: ``n`` pixels as an ``(N, D)`` matrix, or for ``ce``
    with ``b`` set ``b`` images of ``hw x hw`` (``(B, D, H, W)``). ``pixel`` and ``pool``:
    ``b`` images of ``hw x hw`` (per view). With ``b``, ``n = b * hw**2``. ``grad2``: the
    second operand (prototypes; keys for ``pixel``) requires grad in ``fwdbwd`` mode.
    ``option``: see ``OPTIONS``.
    """
    op: str
    mode: str = "fwdbwd"  # "fwd" | "fwdbwd"
    d: int = 256
    c: int = 342
    n: int = 0
    b: int = 0
    hw: int = 0
    dtype: str = "float32"
    grad2: bool = False
    option: str = ""

    def __post_init__(self):
        if self.op not in OPS or self.mode not in ("fwd", "fwdbwd"):
            raise ValueError(f"bad case {self}")
        if self.op == "pseudo" and self.mode != "fwd":
            raise ValueError("pseudo-labels have no backward")
        if self.option not in OPTIONS.get(self.op, ("",)):
            raise ValueError(f"{self.op} has no option {self.option!r}")
        if self.op == "ce" and self.option and not self.b:
            raise ValueError("ce options are benchmarked on (B, D, H, W) inputs: set b and hw")
        if self.op in ("pixel", "pool") or (self.op == "ce" and self.b):
            object.__setattr__(self, "n", self.b * self.hw * self.hw)

    @property
    def spatial(self) -> bool:
        return self.op in ("pixel", "pool") or bool(self.b)

    @property
    def backward(self) -> bool:
        return self.mode == "fwdbwd"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        if self.spatial:
            size = f"B={self.b} {self.hw}x{self.hw}"
        else:
            size = f"N={self.n}"
        grad = " P.grad" if self.grad2 and self.backward and self.op != "pixel" else ""
        grad = " k.grad" if self.grad2 and self.backward and self.op == "pixel" else grad
        opt = f" {self.option}" if self.option else ""
        return f"{size} D={self.d} C={self.c} {self.dtype}{grad}{opt}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ inputs
def make_inputs(case: Case, device, seed: int = 0) -> dict:
    """Unit-norm random features/prototypes of ``case.dtype`` and labels with 10% ignored
    (features not normalised for the ``normalize`` option), and the option's tensors:
    ``w`` class weights, ``cm`` a class mask.

    Leaves that the backward pass differentiates have ``requires_grad`` set.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: 6.4M x 256 is big
    dt, d, c, n = case.torch_dtype, case.d, case.c, case.n
    bwd = case.backward

    def unit(*shape, dim=-1, grad=False, raw=False):
        x = torch.randn(*shape, generator=g, device=device)
        x = (x if raw else F.normalize(x, dim=dim)).to(dt)
        return x.requires_grad_(grad)

    def labels(*shape):
        y = torch.randint(0, c, shape, generator=g, device=device)
        y[torch.rand(shape, generator=g, device=device) < 0.1] = IGNORE
        return y

    raw = case.option in ("normalize", "prenorm")
    if case.op == "ce" and case.spatial:
        x = {"f": unit(case.b, d, case.hw, case.hw, dim=1, grad=bwd, raw=raw),
             "p": unit(c, d, grad=bwd and case.grad2), "y": labels(case.b, case.hw, case.hw)}
        if case.option == "weight":
            x["w"] = 0.5 + torch.rand(c, generator=g, device=device)
        if case.option in ("mask", "mask_bc"):
            rows = case.b if case.option == "mask_bc" else 1
            x["cm"] = (torch.rand(rows, c, generator=g, device=device) >= 0.2).squeeze(0)
        return x
    if case.op in ("ce", "pseudo"):
        return {"f": unit(n, d, grad=bwd, raw=raw), "p": unit(c, d, grad=bwd and case.grad2),
                "y": labels(n)}
    if case.op == "consistency":
        return {"f": unit(n, d, grad=bwd, raw=raw), "t": unit(n, d, raw=raw),
                "p": unit(c, d, grad=bwd and case.grad2)}
    shape = (case.b, d, case.hw, case.hw)
    if case.op == "pool":
        return {"f": unit(*shape, dim=1, grad=bwd), "y": labels(case.b, case.hw, case.hw)}
    return {"f": unit(*shape, dim=1, grad=bwd, raw=raw), "y": labels(case.b, case.hw, case.hw),
            "k": unit(*shape, dim=1, grad=bwd and case.grad2, raw=raw),
            "yk": labels(case.b, case.hw, case.hw)}


# ------------------------------------------------------------------ implementations
def _loss(case: Case, backend: str) -> Callable[[dict], torch.Tensor]:
    """The op through the public API, reduced to a scalar (a tensor for pseudo-labels)."""
    op, c, opt = case.op, case.c, case.option
    if opt == "prenorm":
        plain = _loss(dataclasses.replace(case, option=""), backend)
        return lambda x: plain({k: F.normalize(v, dim=1) if k in NORM_KEYS else v
                                for k, v in x.items()})
    norm = ({"normalize": True} if opt == "normalize" else
            {"memory": "low"} if opt == "memory_low" else {})
    if op == "ce":
        smooth = {"label_smoothing": SMOOTHING} if opt == "smoothing" else {}
        return lambda x: mk.prototype_contrast_loss(
            x["f"], x["p"], x["y"], tau=TAU, ignore_index=IGNORE, weight=x.get("w"),
            class_mask=x.get("cm"), backend=backend, **smooth, **norm)
    if op == "consistency":
        return lambda x: mk.prototype_consistency_loss(x["f"], x["t"], x["p"], backend=backend,
                                                       **norm)
    if op == "pixel":
        return lambda x: mk.pixel_contrast_loss(x["f"], x["y"], x["k"], x["yk"], tau=TAU,
                                                ignore_index=IGNORE, num_classes=c,
                                                backend=backend, normalize=bool(norm))
    if op == "pool":
        return lambda x: mk.masked_average_pool(x["f"], x["y"], c, ignore_index=IGNORE,
                                                backend=backend)[0].sum()
    return lambda x: mk.pseudo_label(x["f"], x["p"], ignore_index=IGNORE, backend=backend)[0]


def _masked_ce(x: dict) -> torch.Tensor:
    """A class mask the way a user applies it: -inf logits, targets of masked classes
    ignored (per image for a (B, C) mask)."""
    f, y, cm = x["f"], x["y"], x["cm"]
    rows = cm.expand(f.shape[0], -1) if cm.dim() == 1 else cm
    z = torch.einsum("bdhw,cd->bchw", f, x["p"]) / TAU
    z = z.masked_fill(~rows[:, :, None, None], float("-inf"))
    keep = rows.gather(1, y.clamp(min=0).flatten(1)).view_as(y)
    return F.cross_entropy(z, torch.where(keep, y, IGNORE), ignore_index=IGNORE)


def _idiomatic(case: Case) -> Callable[[dict], torch.Tensor]:
    """What a user writes without this library (the ``eager`` and ``compile`` baselines):
    with the ``normalize`` option, ``F.normalize`` first."""
    opt = case.option
    if opt == "memory_low":  # a user's eager loss has no such choice
        return _idiomatic(dataclasses.replace(case, option=""))
    if opt in ("normalize", "prenorm"):
        plain = _idiomatic(dataclasses.replace(case, option=""))
        return lambda x: plain({k: F.normalize(v, dim=1) if k in NORM_KEYS else v
                                for k, v in x.items()})
    if case.op == "ce" and opt in ("mask", "mask_bc"):
        return _masked_ce
    if case.op == "ce":
        kw = {"weight": "w"} if opt == "weight" else {}
        smooth = SMOOTHING if opt == "smoothing" else 0.0
        if case.spatial:
            return lambda x: F.cross_entropy(
                torch.einsum("bdhw,cd->bchw", x["f"], x["p"]) / TAU, x["y"],
                ignore_index=IGNORE, label_smoothing=smooth, **{k: x[v] for k, v in kw.items()})
        return lambda x: F.cross_entropy(x["f"] @ x["p"].t() / TAU, x["y"], ignore_index=IGNORE)
    if case.op == "consistency":
        def con(x):
            with torch.no_grad():
                target = torch.softmax(x["t"] @ x["p"].t() / 0.04, -1)
            return F.cross_entropy(x["f"] @ x["p"].t() / TAU, target)
        return con
    if case.op == "pseudo":
        def pseudo(x):
            best = (x["f"] @ x["p"].t()).max(-1)
            return torch.where(best.values >= 0.8, best.indices, IGNORE)
        return pseudo
    return _loss(case, "reference")


def _lce(x):
    # The chunked path (options set) is the memory-saving one; options=None materialises logits.
    return F.linear_cross_entropy(x["f"], x["p"] / TAU, x["y"], ignore_index=IGNORE,
                                  options=torch.nn.LinearCrossEntropyOptions())


def _liger(x):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)(x["p"] / TAU, x["f"], x["y"])


def _cce(x):
    from cut_cross_entropy import linear_cross_entropy
    return linear_cross_entropy(x["f"], x["p"] / TAU, x["y"], ignore_index=IGNORE)


_EXTERNAL = {"lce": (_lce, None), "liger": (_liger, "liger_kernel"),
             "cce": (_cce, "cut_cross_entropy")}


def unavailable(case: Case, impl: str, device: torch.device) -> str | None:
    """None if ``impl`` can run ``case`` on ``device``, else why not."""
    device = torch.device(device)
    if impl in ("eager", "reference"):
        return None
    if impl in KERNELS:
        if impl == "triton" and device.type != "cuda":
            return "triton runs on CPU only through its interpreter, whose timings mean nothing"
        try:
            dispatch.resolve(PHASES[case.op], impl, device)
        except RuntimeError as exc:
            return str(exc)
        return None
    if impl == "compile":
        return "pseudo-labels have nothing to compile beyond one matmul" if case.op == "pseudo" else None
    if impl not in _EXTERNAL:
        raise ValueError(f"unknown impl {impl!r}")
    if case.op != "ce":
        return f"{impl} computes a plain linear cross-entropy (the class loss only)"
    if case.spatial or case.option:
        return f"{impl} takes an (N, D) matrix and none of the options"
    module = _EXTERNAL[impl][1]
    if module is not None:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        if device.type != "cuda":
            return f"{module} needs a CUDA device"
    elif not hasattr(F, "linear_cross_entropy"):
        return "this torch has no torch.nn.functional.linear_cross_entropy"
    return None


def runner(case: Case, impl: str, x: dict) -> Callable[[], object]:
    """A no-argument callable doing one forward (and backward, in ``fwdbwd`` mode)."""
    if impl in _EXTERNAL:
        loss = _EXTERNAL[impl][0]
    elif impl == "eager":
        loss = _idiomatic(case)
    elif impl == "compile":
        torch._dynamo.reset()  # one fresh graph per case: shapes differ between cases
        loss = torch.compile(_idiomatic(case), dynamic=False)
    else:
        loss = _loss(case, impl)
    leaves = [t for t in x.values() if t.requires_grad]
    if not case.backward:
        return lambda: loss(x)

    def step():
        for t in leaves:
            t.grad = None
        loss(x).backward()
    return step


# ------------------------------------------------------------------ floor
def floor(case: Case, x: dict) -> tuple[Callable[[], object], str]:
    """The bare work every implementation must do, and a description of it.

    Matrix products with logits Z = F @ P^T (N x C): forward 1 GEMM (2 for consistency:
    student and teacher); backward dF = dZ @ P, plus dP = dZ^T @ F when the prototypes
    require grad. Pixel-to-pixel: the same per image with keys in place of prototypes
    (batched). Pooling does no GEMM: its floor is one streaming copy of the features per
    pass (forward reads them, backward writes their gradient).
    """
    op, dev, dt = case.op, x["f"].device, case.torch_dtype
    if op == "pool":
        f = x["f"].detach()
        passes = 2 if case.backward else 1
        return (lambda: [f.clone() for _ in range(passes)]), f"{passes} copy of feats"
    f = x["f"].detach()
    if op == "ce" and case.spatial:  # the products on (B, P, D) views, as the kernels see them
        f = f.flatten(2).transpose(1, 2)
    if op == "pixel":
        q = f.flatten(2).transpose(1, 2)  # (B, P, D)
        k = x["k"].detach().flatten(2)    # (B, D, P)
        dz = torch.randn(q.shape[0], q.shape[1], k.shape[2], device=dev, dtype=dt)
        prods = [lambda: torch.bmm(q, k)]
        if case.backward:
            prods.append(lambda: torch.bmm(dz, k.transpose(1, 2)))
            if case.grad2:
                prods.append(lambda: torch.bmm(dz.transpose(1, 2), q))
    else:
        p = x["p"].detach()
        dz = (torch.randn(*f.shape[:-1], p.shape[0], device=dev, dtype=dt) if case.backward
              else None)
        prods = [lambda: f @ p.t()]
        if op == "consistency":
            t = x["t"]
            prods.append(lambda: t @ p.t())
        if case.backward:
            prods.append(lambda: dz @ p)
            if case.grad2:
                prods.append(lambda: dz.flatten(0, -2).t() @ f.flatten(0, -2))
    return (lambda: [m() for m in prods]), f"{len(prods)} GEMM"


def gemm_flops(case: Case) -> int:
    """FLOPs of the matrix products of ``floor`` (0 for pooling, which has none): what an
    implementation's throughput as a fraction of the machine's GEMM peak counts."""
    if case.op == "pool":
        return 0
    if case.op == "pixel":
        one = 2 * case.b * (case.hw * case.hw) ** 2 * case.d
    else:
        one = 2 * case.n * case.c * case.d
    count = 1 + (case.op == "consistency") + case.backward + (case.backward and case.grad2)
    return count * one


def min_bytes(case: Case) -> int:
    """Bytes a perfectly fused implementation must move: read each input once, write each
    output once (per-pixel float32 statistics, int64 labels, gradients of the inputs'
    dtype; the backward pass re-reads its inputs)."""
    es = torch.tensor([], dtype=case.torch_dtype).element_size()
    n, d, c = case.n, case.d, case.c
    feats, protos = n * d * es, c * d * es
    if case.op == "pool":
        fwd = feats + n * 8 + case.b * c * d * 4
        bwd = n * 8 + case.b * c * d * 4 + feats
        return fwd + (bwd if case.backward else 0)
    if case.op == "pseudo":
        return feats + protos + n * 12
    if case.op == "pixel":
        fwd = 2 * feats + 2 * n * 8 + n * 4
        bwd = 2 * feats + 2 * n * 8 + n * 4 + feats * (2 if case.grad2 else 1)
        return fwd + (bwd if case.backward else 0)
    reads = feats * (2 if case.op == "consistency" else 1) + protos
    fwd = reads + n * 8 + 3 * n * 4
    bwd = reads + n * 8 + n * 4 + feats + (c * d * 4 if case.grad2 else 0)
    return fwd + (bwd if case.backward else 0)
