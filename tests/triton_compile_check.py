"""Compile every Triton kernel (each constexpr flag variant) for sm_90 without a GPU.

Catches what the interpreter cannot: compiled-mode-only errors (control flow, types of
loop-carried values, tl.dot shapes). Run without TRITON_INTERPRET:
``python tests/triton_compile_check.py [bf16|fp16|fp32]``; exits 1 on any failure.
"""
import importlib
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mdp_kernels.triton import _launch  # noqa: E402

MODULES = ("ce_fwd", "ce_bwd", "con_fwd", "con_bwd", "pix_fwd", "pix_bwd", "class_sums",
           "pseudo_label")
INT64 = {"ta_ptr", "tb_ptr", "lab_ptr"}
BOOL = {"mask_ptr", "qm_ptr", "km_ptr"}
ACC = {"lse_ptr", "za_ptr", "zb_ptr", "ce_ptr", "ent_ptr", "lss_ptr", "lst_ptr", "gl_ptr",
       "ga_ptr", "gb_ptr", "g_ptr", "part_ptr", "sums_ptr", "dp_ptr", "score_ptr", "bias_ptr"}
FLOATS = {"scale", "scale_s", "scale_t", "threshold"}
FLAGS = ("HAS_TB", "HAS_BIAS", "HAS_MASK", "NEED_F", "ATOMIC")


def signature(mod, fn, dtype):
    sig = {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in INT64 or (name == "t_ptr" and mod == "class_sums"):
            sig[name] = "*i64"
        elif name == "counts_ptr":
            sig[name] = "*i32"
        elif name in BOOL:
            sig[name] = "*i1"
        elif name in ACC:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def main(dtype):
    failed = 0
    for mod in MODULES:
        m = importlib.import_module(f"mdp_kernels.triton.{mod}")
        for k in (k for k in vars(m).values() if isinstance(k, _launch.Kernel)):
            fn = k.fn
            sig = signature(mod, fn, dtype)
            base = {n: True for n, t in sig.items() if t == "constexpr"}
            base.update(k.interp, BLOCK_D=128)
            if "ACC" in base:
                base["ACC"] = tl.float32
            flags = [f for f in FLAGS if f in base]
            for meta in [base] + [{**base, f: False} for f in flags]:
                consts = {(fn.arg_names.index(n),): v for n, v in meta.items()}
                try:
                    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                   target=GPUTarget("cuda", 90, 32))
                    print("ok  ", fn.__name__, {f: meta[f] for f in flags}, flush=True)
                except Exception as exc:  # report every failure, then exit 1
                    failed += 1
                    print("FAIL", fn.__name__, {f: meta[f] for f in flags}, exc, flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1] if len(sys.argv) > 1 else "bf16") else 0)
