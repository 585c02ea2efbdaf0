"""Compile what the GPU will run, for sm_90, without a GPU: every Triton kernel, every config
that survives pruning (``Kernel.fitting``) at D = 256 and at the largest D the dtype takes,
for bf16 / fp16 / fp32 / fp64, with every constexpr flag on; then the first config with each
flag off; and the normalize kernels (fixed blocks, any D) once per dtype. Reports shared memory (and the pruning estimate), registers and the stack frame, where
ptxas puts register spills (``cuobjdump --dump-resource-usage`` on the cubin); exits 1 on a
config that cannot run (a compile error, or more shared memory than an sm_90 block can get).

Catches what the interpreter cannot (compiled-mode-only errors, layouts a Triton version
cannot lower, shared-memory overflow). Use the Triton version of the GPU machine, e.g.::

    python -m venv --system-site-packages /tmp/tri36 && /tmp/tri36/bin/pip install triton==3.6.0
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/tri36/lib/python3.11/site-packages/mdp.pth
    /tmp/tri36/bin/python tests/triton_compile_check.py [-j 2] [--json out.json] [bf16 fp32 ...]

(or ``MDP_TRITON_COMPILE_CHECK=1 pytest tests/test_triton_kernels.py -k sm90``). fp32 is
compiled with the default tf32x3 products; ``MDP_TRITON_FP32=tf32`` checks the TF32 configs.
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mdp_kernels.triton import _launch, normalize  # noqa: E402

MODULES = ("ce_fwd", "ce_bwd", "con_fwd", "con_bwd", "pix_fwd", "pix_bwd", "class_sums",
           "pseudo_label")
NORMALIZE = ("_normalize_fwd", "_normalize_bwd")  # mdp_kernels.triton.normalize, no Kernel
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp64": torch.float64}
INT64 = {"lab_ptr"}
INT32 = {"ta_ptr", "tb_ptr", "mask_ptr", "qm_ptr", "km_ptr", "counts_ptr"}  # see _tiles
ACC = {"lse_ptr", "za_ptr", "zb_ptr", "ce_ptr", "ent_ptr", "lss_ptr", "lst_ptr", "gl_ptr",
       "ga_ptr", "gb_ptr", "g_ptr", "part_ptr", "sums_ptr", "dp_ptr", "bias_ptr", "sw_ptr",
       "zq_ptr", "gq_ptr"}
FLOATS = {"scale", "scale_s", "scale_t", "threshold"}
FLAGS = ("HAS_TB", "HAS_BIAS", "HAS_SW", "HAS_MASK", "NEED_F", "ATOMIC")


def kernels():
    for mod in MODULES:
        m = importlib.import_module(f"mdp_kernels.triton.{mod}")
        for name, k in vars(m).items():
            if isinstance(k, _launch.Kernel):
                yield mod, name, k


def signature(mod, fn, dt):
    acc = "fp64" if dt == "fp64" else "fp32"
    sig = {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in INT64 or (name == "t_ptr" and mod == "class_sums"):
            sig[name] = "*i64"
        elif name in INT32:
            sig[name] = "*i32"
        elif name == "bias_ptr" or name == "score_ptr":
            sig[name] = "*fp32"
        elif name in ACC and mod != "normalize" or name == "n_ptr":  # norms: acc dtype
            sig[name] = f"*{acc}"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dt}"
        else:
            sig[name] = "fp32" if name in FLOATS or name == "eps" else "i32"
    return sig


def resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}


def compile_one(job):
    mod, name, dt, d, meta, warps, stages, flags = job
    dtype = DTYPES[dt]
    if mod == "normalize":
        k, fn = None, getattr(normalize, name)
        consts = dict(meta, INTERPRETED=False)
    else:
        k = next(k for m, n, k in kernels() if (m, n) == (mod, name))
        fn = k.fn
        consts = dict(meta, BLOCK_D=_launch.block_d(d, dtype))
    sig = signature(mod, fn, dt)
    consts = {**{n: True for n, t in sig.items() if t == "constexpr"}, **consts, **flags}
    if "PREC" in consts:
        consts["PREC"] = _launch.precision(dtype)
    if "ACC" in consts:
        consts["ACC"] = _launch.tl_acc(dtype)
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    cfg = triton.Config(meta, num_warps=warps, num_stages=stages)
    es = dtype.itemsize
    est = None if k is None else k.cost(cfg, consts["BLOCK_D"], es,
                                        _launch.acc_dtype(dtype).itemsize,
                                        _launch.precision(dtype) == "tf32x3")[0]
    row = dict(kernel=fn.__name__, dtype=dt, D=d, meta=meta, num_warps=warps,
               num_stages=stages, flags=flags, smem_estimate=est)
    t0 = time.time()
    try:
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=stages))
        row.update(ok=True, shared=ck.metadata.shared, **resources(ck.asm["cubin"]))
        if row["shared"] > _launch.SMEM_SM90:
            row.update(ok=False, error=f"shared memory {row['shared']} > {_launch.SMEM_SM90}")
    except Exception as exc:  # noqa: BLE001  every failure is reported, then exit 1
        row.update(ok=False, error=str(exc).strip().splitlines()[-1][:300])
    row["seconds"] = round(time.time() - t0, 1)
    return row


def jobs(dtypes):
    out = []
    for mod, name, k in kernels():
        flag_names = [f for f in FLAGS if f in k.fn.arg_names]
        for dt in dtypes:
            dtype = DTYPES[dt]
            for d in sorted({min(256, _launch.max_dim(dtype)), _launch.max_dim(dtype)}):
                fits = k.fitting(_launch.block_d(d, dtype), dtype, limit=_launch.SMEM_SM90)
                on = {f: True for f in flag_names}
                for i, c in enumerate(fits):
                    out.append((mod, name, dt, d, c.kwargs, c.num_warps, c.num_stages, on))
                    if i == 0:
                        out += [(mod, name, dt, d, c.kwargs, c.num_warps, c.num_stages,
                                 {**on, f: False}) for f in flag_names]
                if not fits:
                    out.append((mod, name, dt, d, None, 0, 0, on))
    blocks = dict(BLOCK_P=normalize.BLOCK_P, BLOCK_D=normalize.BLOCK_D)
    # Triton's default warps and stages, as normalize launches them
    out += [("normalize", name, dt, 256, blocks, 4, 3, {}) for name in NORMALIZE
            for dt in dtypes]
    return out


def run(job):
    if job[4] is None:
        return dict(kernel=job[1], dtype=job[2], D=job[3], ok=False,
                    error="no config survives pruning", seconds=0)
    return compile_one(job)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dtypes", nargs="*", help=f"of {', '.join(DTYPES)} (default: all)")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--json", help="write every row here")
    a = ap.parse_args(argv)
    bad = set(a.dtypes) - set(DTYPES)
    if bad:
        ap.error(f"unknown dtypes {sorted(bad)}")
    todo = jobs(a.dtypes or list(DTYPES))
    print(f"triton {triton.__version__}: {len(todo)} compiles for sm_90", flush=True)
    rows = []
    with ProcessPoolExecutor(a.jobs) as pool:
        for r in pool.map(run, todo):
            rows.append(r)
            off = [f for f, v in r.get("flags", {}).items() if not v]
            print(("ok  " if r["ok"] else "FAIL"), r["kernel"], r["dtype"], f"D={r['D']}",
                  r.get("meta"), f"w{r.get('num_warps')} s{r.get('num_stages')}",
                  f"off={off}" if off else "",
                  f"shared={r.get('shared')} (est {r.get('smem_estimate')}) reg={r.get('reg')}"
                  f" stack={r.get('stack')} {r.get('seconds')}s", r.get("error", ""),
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)
    failed = [r for r in rows if not r["ok"]]
    spills = [r for r in rows if r.get("stack") or r.get("local")]
    under = [r for r in rows if r.get("shared", 0) > (r.get("smem_estimate") or 1 << 30)]
    print(f"{len(rows) - len(failed)}/{len(rows)} compiled; {len(spills)} with a stack frame "
          f"(spills, max {max((r.get('stack') or 0) for r in rows)} B); max shared "
          f"{max((r.get('shared') or 0) for r in rows)} B; {len(under)} above their estimate")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
