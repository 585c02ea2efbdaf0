"""Launch plumbing shared by the Triton kernels: config lists and their pruning, the fp32
dot precision, the feature-dim limit and pixel chunking.

Configs. Each kernel has a short list of (block sizes, num_warps, num_stages), the one
with the fewest register spills first. On a GPU ``triton.autotune`` tries the configs that
survive pruning: a config is dropped before it is compiled when its shared-memory estimate
(``Kernel.cost``: operand tiles loaded once, plus the buffers of those loaded in the loop)
exceeds what a block can get, or its accumulators need more than 128 fp32 registers per
thread (they would spill). The
autotune key is the kernel's size arguments (C, D, and P or PK: pixels per image), the D and
P strides of each (B, D, P) operand (``s?d``, ``s?p``: NCHW and channels-last coalesce
different loads), every constexpr that is not a tuned block size (dtype-dependent flags,
HAS_*, NEED_F, ATOMIC, PREC), and the tensors' dtypes. ``mdp_kernels.config.triton_autotune = False`` pins every
kernel to its first surviving config: one compile per variant, no benchmarking. Under
``TRITON_INTERPRET=1`` the list is a single large-block config (the interpreter pays per
operation, not per element). ``config.triton_meta`` pins block sizes for tests.

fp32 inputs (``precision``): ``tl.dot`` with ``input_precision="tf32x3"`` (three TF32
tensor-core products, about fp32 accuracy, within the 1e-5 contract), or ``"tf32"`` when
``torch.backends.cuda.matmul.allow_tf32`` is True (as torch's own fp32 matmuls then do).
``config.triton_fp32 = "ieee"`` (or ``MDP_TRITON_FP32=ieee``) forces IEEE fp32 products:
FMA loops, not tensor cores, slow on a GPU. bf16/fp16/fp64 products are exact in their
accumulator (fp32, fp64).

Feature dim: the whole of D is one tile, so one feature row must fit in 1 KB:
D <= 512 for bf16/fp16, 256 for fp32, 128 for fp64 (``max_dim``). Larger D raises
``ValueError`` before any launch.
"""
from __future__ import annotations

import inspect
import os
import re
from typing import Callable

import torch
import triton
import triton.language as tl

from ..config import config
from ..layout import acc_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Settings (mdp_kernels.config): deterministic (dprotos without float atomics: a class-tile
# program per pixel chunk writes a partial, summed in a fixed order; off, the pixel-block
# backward also adds its dprotos share with tl.atomic_add, one logit recompute instead of
# two), triton_autotune, triton_fp32 and triton_meta (pinned meta-parameters).

ROW_BYTES = 1024  # one feature row (BLOCK_D elements) at most
SMEM_SM90 = 232448  # 227 KB: the opt-in shared memory per block of sm_90
MAX_REGS = 128  # fp32 accumulator registers per thread a config may need
SCRATCH = 2048  # shared memory of reductions and layout conversions besides the tiles
LAYOUT = re.compile(r"s[a-z][dp]")  # the D and P strides of a (B, D, P) operand

def grid_configs(names: tuple[str, str], rows) -> list[tuple[dict, int, int]]:
    """Configs from ((block a, block b), num_warps, num_stages) rows."""
    return [(dict(zip(names, blocks)), w, s) for blocks, w, s in rows]


# Lists chosen from tests/triton_compile_check.py (Triton 3.6, sm_90, bf16, D = 256): the
# configs without (or with the fewest) register spills, the one with none first. SMALL ends
# every list: it is what fits fp32 (tf32x3) and the largest D. tf32x3 wants 16-wide class
# tiles: at 32 ptxas puts its operands on the stack (6-8 KB per thread).
SMALL = [((32, 16), 4, 2), ((32, 32), 8, 2)]
FWD_CONFIGS = grid_configs(("BLOCK_P", "BLOCK_C"), [((64, 64), 4, 2), ((128, 64), 8, 2),
                                                   ((128, 64), 8, 3), ((64, 16), 4, 2)]
                           + SMALL)


def tl_acc(dtype: torch.dtype):
    """The accumulation type of ``dtype`` inputs as a Triton type (``layout.acc_dtype``)."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype`` (see the module docstring)."""
    if dtype != torch.float32:
        return "ieee"
    if config.triton_fp32 != "auto":
        return config.triton_fp32
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def bias_row_stride(bias: torch.Tensor | None) -> int:
    """Elements between the class-bias rows of two images: C for a per-image (B, C) bias,
    0 for one (C,) bias shared by every image (or none)."""
    return bias.stride(0) if bias is not None and bias.dim() == 2 else 0


def max_dim(dtype: torch.dtype) -> int:
    """The largest feature dim the Triton kernels take for ``dtype``."""
    return ROW_BYTES // dtype.itemsize


def block_d(d: int, dtype: torch.dtype) -> int:
    """The whole feature dim in one tile (tl.dot needs every block dim >= 16); raises
    ``ValueError`` when D is beyond ``max_dim(dtype)``."""
    if d > max_dim(dtype):
        raise ValueError(f"the triton backend takes feature dims up to {max_dim(dtype)} for "
                         f"{dtype} (one row of D elements in 1 KB of shared memory), got "
                         f"D = {d}; use backend='reference' (any device), 'cuda' for CUDA tensors or "
                         f"'cpu' for CPU ones")
    return max(16, triton.next_power_of_2(d))


def smem_limit() -> int:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return getattr(props, "shared_memory_per_block_optin", SMEM_SM90)
    return SMEM_SM90


class Kernel:
    """A ``@triton.jit`` kernel launched as ``k[grid](*args, **constexprs)``.

    ``configs``: (meta, num_warps, num_stages) tuples, the safest first. ``tiles(meta, bd)``
    gives, in elements, (operand tiles loaded once, operand tiles loaded per loop step,
    register accumulators); ``interp`` is the single interpreter config; ``key`` the size
    arguments of the autotune key (the layout strides and flags are added); ``grid`` a
    function of the meta-parameter dict.
    """

    def __init__(self, fn, configs: list[tuple[dict, int, int]], tiles: Callable,
                 interp: dict, key: list[str], reset_to_zero: list[str] | None = None):
        self.fn = fn
        self.interp = interp
        self.tiles = tiles
        self.configs = [triton.Config(m, num_warps=w, num_stages=s) for m, w, s in configs]
        tuned = set(interp)
        params = inspect.signature(fn.fn).parameters
        self.key = list(key) + [n for n in fn.arg_names if LAYOUT.fullmatch(n)] + [
            n for n in fn.arg_names if params[n].annotation is tl.constexpr and n not in tuned]
        cfgs = [triton.Config(interp)] if INTERPRET else self.configs
        self.tuned = triton.autotune(cfgs, key=self.key, reset_to_zero=reset_to_zero,
                                     prune_configs_by={"early_config_prune": self.prune})(fn)

    def cost(self, cfg: triton.Config, bd: int, esize: int, acc_size: int,
             split: bool = False) -> tuple[int, int]:
        """(shared-memory bytes, accumulator registers per thread) estimated for ``cfg``.
        Loop tiles are double-buffered even at num_stages = 1; ``split``: tf32x3 operands,
        stored as a high and a low part. Calibrated against Triton 3.6 for sm_90: an upper
        bound for every config of tests/triton_compile_check.py under the default fp32
        policy; under TF32 one flag variant exceeds it, still within the limit (README,
        GPU check)."""
        once, loop, acc = self.tiles(cfg.kwargs, bd)
        return (SCRATCH + (1 + split) * esize * (once + max(2, cfg.num_stages) * loop),
                acc * acc_size // 4 // (32 * cfg.num_warps))

    def fitting(self, bd: int, dtype: torch.dtype, limit: int | None = None) -> list:
        """The configs that survive pruning for BLOCK_D = ``bd`` and inputs of ``dtype``."""
        limit = smem_limit() if limit is None else limit
        split = precision(dtype) == "tf32x3"
        out = []
        for c in self.configs:
            smem, regs = self.cost(c, bd, dtype.itemsize, acc_dtype(dtype).itemsize, split)
            if smem <= limit and regs <= MAX_REGS:
                out.append(c)
        return out

    def prune(self, configs, named_args, **kwargs):
        dtype = named_args[self.fn.arg_names[0]].dtype
        keep = [c for c in self.fitting(kwargs["BLOCK_D"], dtype) if c in configs]
        if not keep:
            raise ValueError(f"{self.fn.__name__}: no config fits BLOCK_D = "
                             f"{kwargs['BLOCK_D']} for {dtype}")
        return keep

    def chunks(self, batch: int, pixels: int, num_classes: int) -> int:
        """Pixel chunks per image for this class-tile reduction kernel (``chunks``), counted
        with its largest class tile (the pinned one under ``config.triton_meta``), so the GPU
        fills whichever config autotune picks."""
        forced = (config.triton_meta or {}).get("BLOCK_C")
        tile = forced or max(c.kwargs["BLOCK_C"] for c in self.configs)
        return chunks(batch, pixels, triton.cdiv(num_classes, tile))

    def reduce_classes(self, batch: int, pixels: int, num_classes: int, dim: int, dtype,
                       device, launch: Callable) -> torch.Tensor:
        """A (C, D) reduction over pixels without float atomics: ``launch(part, chunk, n)``
        runs this kernel with ``n`` chunks of ``chunk`` pixels per image, each program
        writing its slice of ``part`` (B n, C, D), which is then summed in a fixed order."""
        n = self.chunks(batch, pixels, num_classes)
        part = torch.empty(batch * n, num_classes, dim, dtype=dtype, device=device)
        launch(part, triton.cdiv(pixels, n), n)
        return part.sum(0)

    def __getitem__(self, grid):
        forced = config.triton_meta
        if forced:
            meta = {k: forced.get(k, v) for k, v in self.interp.items()}
            meta.update({k: forced[k] for k in ("num_warps", "num_stages") if k in forced})

            def launch(*args, **kw):
                return self.fn[grid](*args, **kw, **meta)
            return launch
        if INTERPRET or config.triton_autotune:
            return self.tuned[grid]

        def pinned(*args, **kw):
            cfg = self.prune(self.configs, dict(zip(self.fn.arg_names, args)), **kw)[0]
            return self.fn[grid](*args, **kw, **cfg.all_kwargs())
        return pinned


def chunks(batch: int, pixels: int, class_tiles: int) -> int:
    """Pixel chunks per image for the class-tile reductions: enough programs to fill the
    GPU (about 4 per SM), never more than one per 128 pixels."""
    forced = config.triton_meta or {}
    if "CHUNKS" in forced:
        return max(1, min(forced["CHUNKS"], pixels))
    if INTERPRET or not torch.cuda.is_available():
        return 1
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = triton.cdiv(4 * sms, max(1, batch * class_tiles))
    return max(1, min(want, triton.cdiv(pixels, 128)))
