"""Launch plumbing shared by the Triton kernels: block-size configs, pixel chunking for the
deterministic class-tile reductions, and the deterministic switch.

On a GPU every kernel is wrapped in ``triton.autotune`` over a small config list. Under
``TRITON_INTERPRET=1`` the list is a single config (autotune then never benchmarks), with
large blocks because the interpreter pays per operation, not per element.
``forced(...)`` pins block sizes for tests (config invariance) and bypasses autotune.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# dprotos (and class sums) without float atomics: a class-tile program per pixel chunk writes
# a partial, the partials are summed in a fixed order. False: the pixel-block backward
# kernel also adds its dprotos share with tl.atomic_add (one logit recompute instead of two,
# run-to-run nondeterministic in the last bits). Set before calling, or
# MDP_TRITON_DETERMINISTIC=0 in the environment.
deterministic = os.environ.get("MDP_TRITON_DETERMINISTIC", "1") != "0"

_forced: dict = {}


@contextlib.contextmanager
def forced(**meta):
    """Run every kernel with these meta-parameters (BLOCK_P, BLOCK_C, BLOCK_Q, BLOCK_K,
    CHUNKS: pixel chunks per image) instead of the autotuned ones."""
    old = dict(_forced)
    _forced.update(meta)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(old)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_d(d: int) -> int:
    """The whole feature dim in one tile: tl.dot needs every block dim >= 16."""
    return max(16, triton.next_power_of_2(d))


class Kernel:
    """A ``@triton.jit`` kernel launched as ``k[grid](*args, **constexprs)``.

    ``configs`` are the GPU autotune candidates, ``interp`` the single interpreter config;
    ``grid`` is a function of the meta-parameter dict, as for ``triton.autotune``.
    """

    def __init__(self, fn, configs: list[dict], interp: dict, key: list[str],
                 reset_to_zero: list[str] | None = None, warps=(4, 8)):
        self.fn = fn
        self.interp = interp
        if INTERPRET:
            cfgs = [triton.Config(interp)]
        else:
            cfgs = [triton.Config(c, num_warps=w, num_stages=s)
                    for c in configs for w in warps for s in (2, 3)]
        self.tuned = triton.autotune(cfgs, key=key, reset_to_zero=reset_to_zero)(fn)

    def __getitem__(self, grid):
        if not _forced:
            return self.tuned[grid]
        meta = {k: _forced.get(k, v) for k, v in self.interp.items()}

        def launch(*args, **kw):
            return self.fn[grid](*args, **kw, **meta)
        return launch


def chunks(batch: int, pixels: int, class_tiles: int) -> int:
    """Pixel chunks per image for the class-tile reductions: enough programs to fill the
    GPU (about 4 per SM), never more than one per 128 pixels."""
    if "CHUNKS" in _forced:
        return max(1, min(_forced["CHUNKS"], pixels))
    if INTERPRET or not torch.cuda.is_available():
        return 1
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = triton.cdiv(4 * sms, max(1, batch * class_tiles))
    return max(1, min(want, triton.cdiv(pixels, 128)))
