"""``make gpu-check``: one command that shows what the kernels do on a GPU, in at most
8 minutes, writing everything under a results folder (and ``$OUT/gpu-check`` when OUT is set).

Stages, each a subprocess with its own deadline (cut to what is left of ``--total``):

1. env      GPU, driver, compute capability, torch, triton, nvcc, compute-sanitizer,
            Liger-Kernel / Cut Cross-Entropy versions (``env.json``)
2. build    ``make install`` (the extension with csrc/cuda for the local GPU); without
            ``make``: ``tools/make_venv.py .venv`` and ``pip install -e .`` instead
3. tests    the shared op tests and the Triton / cuda test files, ``-k "triton or cuda"``,
            every Triton kernel pinned to one config (``MDP_TRITON_AUTOTUNE=0``)
4. memcheck ``compute-sanitizer --tool memcheck`` over ``tools/odd_shapes.py``
5. bench    ``python -m benchmarks.run --preset gpu-check`` (paper sizes: N = 401,408,
            C = 342, D = 256, bf16; N = 6.4M) -> ``benchmarks/results/gpu-check-<gpu>.*``

Without a GPU (or with ``--dry``) the same stages run in dry mode: the tests and the odd
shapes through the Triton interpreter, no sanitizer, the ``tiny`` preset on CPU written into
the results folder only. ``summary.json`` / ``summary.md`` give each stage's status
(ok / failed / timeout / skipped), seconds and log file, and the issue's performance targets
evaluated on the benchmark results (pass / fail / not measured; benchmarks, not tests:
they do not change the exit code); the exit code is 1 if any stage failed. The summary is
written whatever happens to a stage.

    python3 tools/gpu_check.py [--dry] [--no-build] [--total 470] [--results DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PY = str(ROOT / ".venv" / "bin" / "python")
TEST_FILES = ["tests/test_triton_kernels.py", "tests/test_prototype_contrast.py",
              "tests/test_consistency.py", "tests/test_pixel_contrast.py",
              "tests/test_pooling.py", "tests/test_pseudo_label.py",
              "tests/test_cuda_kernels.py", "tests/test_cuda_build.py",
              "tests/test_triton_policy.py"]
# Dry mode: what exercises the stage in seconds through the interpreter.
DRY_TESTS = ["tests/test_triton_policy.py",
             "tests/test_triton_kernels.py::test_block_sizes_and_chunks_match_reference"]
# Seconds per stage on a GPU: build first (a cold CUDA build), then tests and benchmarks;
# --total (470 s) caps their sum, so bench gets at most what is left. env: importing torch
# and initialising CUDA in the probe.
DEADLINES = {"env": 60, "build": 200, "tests": 110, "memcheck": 60, "bench": 150}
# Dry mode (CI): about 3x what each stage takes on a loaded 2-core machine (env 3 s,
# tests 15 s, memcheck 7 s, bench 45-60 s at a load of 4-5), so load does not fail it.
DRY_DEADLINES = {"env": 60, "build": 60, "tests": 90, "memcheck": 60, "bench": 180}
PROBE = r"""
import json, os, torch
out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
               memory_gb=round(p.total_memory / 2**30, 1),
               smem_per_block_optin=getattr(p, "shared_memory_per_block_optin", None))
for mod in ("triton", "liger_kernel", "cut_cross_entropy"):
    try:
        from importlib.metadata import version
        out[mod] = version(mod.replace("_", "-"))
    except Exception as exc:
        out[mod] = None
try:
    import mdp_kernels.extension as e
    out["extension"] = None if e._C is None else {"with_cuda": bool(e._C.with_cuda)}
    import mdp_kernels as mk
    out["backends_cuda"] = mk.available_backends("cuda") if torch.cuda.is_available() else None
except Exception as exc:
    out["extension"] = f"{type(exc).__name__}: {exc}"
print("PROBE " + json.dumps(out))
"""


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Runner:
    def __init__(self, results: Path, total: float):
        self.results = results
        self.end = time.time() + total
        self.stages: list[dict] = []

    def left(self) -> float:
        return self.end - time.time()

    def run(self, name: str, cmd: list[str], deadline: float, env: dict | None = None,
            cwd: Path = ROOT) -> dict:
        """Run ``cmd`` with at most ``deadline`` seconds (and what is left in total), its
        output into ``<name>.log``; records and returns the stage."""
        budget = min(deadline, self.left() - 5)
        log = self.results / f"{name}.log"
        stage = {"stage": name, "cmd": " ".join(cmd), "log": log.name, "deadline_s": budget}
        if budget < 5:
            stage.update(status="skipped", reason="no time left", seconds=0)
            self.stages.append(stage)
            return stage
        t0 = time.time()
        with open(log, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:  # e.g. no such program
                f.write(f"cannot start: {exc}\n")
                stage.update(status="failed", reason=f"cannot start: {exc}")
            else:
                try:
                    rc = proc.wait(timeout=budget)
                    stage["status"] = "ok" if rc == 0 else "failed"
                    stage["rc"] = rc
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)  # the whole group: pytest workers, nvcc, ninja
                    proc.wait()
                    stage["status"] = "timeout"
        stage["seconds"] = round(time.time() - t0, 1)
        stage["tail"] = log.read_text(errors="replace")[-1500:]
        self.stages.append(stage)
        print(f"gpu-check: {name}: {stage['status']} ({stage['seconds']} s)", flush=True)
        return stage


def probe(py: str, env: dict, timeout: float) -> dict:
    """What ``PROBE`` finds with ``py``, or ``{"error": ...}``."""
    try:
        r = subprocess.run([py, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    for line in r.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {"error": (r.stdout + r.stderr)[-1500:]}


def find_tool(name: str) -> str | None:
    """``name`` on PATH, else in the CUDA toolkit (CUDA_HOME, /usr/local/cuda)."""
    dirs = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin"),
            "/usr/local/cuda/bin"]
    return shutil.which(name) or next((os.path.join(d, name) for d in dirs
                                       if os.access(os.path.join(d, name), os.X_OK)), None)


def tool_output(cmd: list[str]) -> str | None:
    """What ``cmd`` prints (None if the tool is absent or fails)."""
    exe = find_tool(cmd[0])
    if exe is None:
        return None
    try:
        r = subprocess.run([exe] + cmd[1:], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (r.stdout + r.stderr).strip()[-400:] if r.returncode == 0 else None


# The performance targets (benchmarks, not tests), read from the bench JSON: the
# cases (benchmarks/presets.py gpu_check) and, per kernel backend, (what, value, bound).
TARGET_CASES = {
    "ce": [("CE fwd+bwd N=401,408 C=342 D=256 bf16, P detached",
            dict(op="ce", mode="fwdbwd", n=401408, c=342, d=256, dtype="bfloat16", grad2=False,
                 option="")),
           ("CE fwd+bwd N=401,408 C=342 D=256 bf16, P with grad",
            dict(op="ce", mode="fwdbwd", n=401408, c=342, d=256, dtype="bfloat16", grad2=True,
                 option=""))],
    "pool": [("masked pooling fwd+bwd B=128 112x112 C=342 D=256 bf16",
              dict(op="pool", mode="fwdbwd", b=128, hw=112, c=342, d=256, dtype="bfloat16"))]}
MIB = 2 ** 20


def _ratio(row: dict, impl: str, base: str) -> float:
    """``impl``'s time over ``base``'s (``floor``, ``bandwidth``: over those floors);
    ``LookupError`` naming why when either was not measured."""
    for name in (impl, base):
        why = row["skipped"].get(name) or row["failed"].get(name)
        if why:
            raise LookupError(f"{name}: {why}")
    q = row["ratios"].get(impl)
    if q is None:
        raise LookupError(f"{impl} not in this run")
    if base not in q:
        raise LookupError(f"{base} not in this run")
    return q[base]


def _mem_mb(row: dict, impl: str) -> float:
    _ratio(row, impl, "floor")  # raises when impl was not measured
    mem = row["impls"][impl]["mem_bytes"]
    if mem is None:
        raise LookupError("memory not measured")
    return mem / MIB


TARGETS = [  # (case group, what, value of (row, impl), ">=" or "<=", bound)
    ("ce", "speed-up over eager", lambda r, i: 1 / _ratio(r, i, "eager"), ">=", 2.0),
    ("ce", "speed-up over Liger-Kernel", lambda r, i: 1 / _ratio(r, i, "liger"), ">=", 1.3),
    ("ce", "speed-up over Cut Cross-Entropy", lambda r, i: 1 / _ratio(r, i, "cce"), ">=", 1.3),
    ("ce", "time / bf16 GEMM floor", lambda r, i: _ratio(r, i, "floor"), "<=", 1.5),
    ("ce", "extra memory (MiB)", _mem_mb, "<=", 64.0),
    ("pool", "share of copy bandwidth", lambda r, i: 1 / _ratio(r, i, "bandwidth"), ">=", 0.7),
]
TARGET_IMPLS = ("triton", "cuda")


def evaluate_targets(bench: dict | None) -> list[dict]:
    """Each target for each kernel backend: value, bound and status (pass / fail /
    not measured, with the reason) from a ``benchmarks.run`` result (None: no results)."""
    out = []
    for group, what, value, op, bound in TARGETS:
        for label, want in TARGET_CASES[group]:
            row = None if bench is None else next(
                (r for r in bench["results"]
                 if all(r["case"].get(k) == v for k, v in want.items())), None)
            for impl in TARGET_IMPLS:
                t = {"case": label, "target": f"{what} {op} {bound:g}", "impl": impl,
                     "value": None}
                try:
                    if row is None:
                        raise LookupError("no benchmark results" if bench is None
                                          else "case not in the benchmark results")
                    v = value(row, impl)
                except LookupError as exc:
                    t["status"] = f"not measured ({exc})"
                else:
                    t["value"] = round(v, 3)
                    t["status"] = "pass" if (v >= bound if op == ">=" else v <= bound) else "fail"
                out.append(t)
    return out


def build(r: Runner, py: str, env: dict, deadline: float) -> None:
    """The build stage: ``make install``; without make (a bare image), the venv and the
    editable install that ``make install`` would do, minus its pip installs of tools."""
    benv = dict(env, MAX_JOBS=str(os.cpu_count() or 2))
    if shutil.which("make", path=env.get("PATH")):
        st = r.run("build", ["make", "install"], deadline, env=benv)
        if st["status"] == "failed" and Path(py).exists():
            # e.g. pip offline without a tool the Makefile installs: build in place
            r.run("build-inplace", [py, "setup.py", "build_ext", "--inplace"], deadline,
                  env=benv)
        return
    if not Path(py).exists() and py == DEFAULT_PY:
        r.run("venv", [sys.executable, str(ROOT / "tools" / "make_venv.py"), ".venv"], 60,
              env=env)
    # ninja of the venv (or the image) on PATH for a parallel build
    benv["PATH"] = os.pathsep.join([str(Path(py).parent), env.get("PATH", os.defpath)])
    r.run("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                    "-e", "."], deadline, env=benv)


def stages(a, r: Runner, info: dict, gpu: bool, results: Path) -> Path:
    """Run the stages into ``r`` (``info``: the env record); returns the bench JSON path."""
    py = a.python
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    if not gpu:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # dry mode even where a GPU exists
    deadline = DEADLINES if gpu else DRY_DEADLINES

    # 2. build (before the probe: on a bare machine make creates the venv)
    if a.no_build:
        r.stages.append({"stage": "build", "status": "skipped", "reason": "--no-build",
                         "seconds": 0})
    else:
        build(r, py, env, deadline["build"])
        wheels = sorted(str(w) for w in (ROOT / "wheels").glob("*.whl"))
        if wheels and Path(py).exists():  # carried competitors (README, GPU check)
            r.run("wheels", [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                             *wheels], 60, env=env)
    # 1. environment
    t0 = time.time()
    info["probe"] = (probe(py, env, max(5.0, min(deadline["env"], r.left())))
                     if Path(py).exists() else {"error": f"{py} not found"})
    r.stages.insert(0, {"stage": "env", "status": "ok" if "error" not in info["probe"]
                        else "failed", "seconds": round(time.time() - t0, 1), "log": "env.json"})
    (results / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"gpu-check: {info['mode']} mode, {info['probe'].get('gpu', 'no GPU')}", flush=True)
    ext = info["probe"].get("extension")
    if gpu and not (isinstance(ext, dict) and ext.get("with_cuda")):
        print(f"gpu-check: the extension has no CUDA kernels ({ext}); cuda tests skip")

    # 3. tests: one pinned config per Triton kernel bounds the compile time
    tenv = dict(env, MDP_TRITON_AUTOTUNE="0")
    files = TEST_FILES if gpu else DRY_TESTS
    cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--junitxml="
           f"{results / 'tests.xml'}", *files]
    if gpu:
        cmd += ["-k", "triton or cuda"]
        if subprocess.run([py, "-c", "import xdist"], capture_output=True).returncode == 0:
            cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    r.run("tests", cmd, deadline["tests"], env=tenv)

    # 4. memcheck on small odd shapes
    odd = [py, str(ROOT / "tools" / "odd_shapes.py"), "--device", "cuda" if gpu else "cpu"]
    if gpu and info["compute_sanitizer"]:
        odd = [find_tool("compute-sanitizer"), "--tool", "memcheck", "--error-exitcode", "1",
               "--target-processes", "all"] + odd
    r.run("memcheck", odd, deadline["memcheck"], env=tenv)

    # 5. benchmarks: the paper's sizes on a GPU (results next to the others), tiny dry
    if gpu:
        out = ROOT / "benchmarks" / "results"
        bench = [py, "-m", "benchmarks.run", "--preset", "gpu-check", "--budget", "0.3",
                 "--out", str(out)]
        stem = f"gpu-check-{slug(info['gpu'])}"
    else:
        out = results / "bench"
        bench = [py, "-m", "benchmarks.run", "--preset", "tiny", "--device", "cpu",
                 "--no-compile", "--budget", "0.05", "--no-memory", "--out", str(out)]
        stem = "tiny-cpu"
    benv = dict(env)
    benv.pop("TRITON_INTERPRET", None)
    r.run("bench", bench, deadline["bench"], env=benv)
    if gpu:
        for f in out.glob(f"{stem}.*"):
            if f.is_file():
                shutil.copy2(f, results / f.name)
    return out / f"{stem}.json"


def write_summary(results: Path, summary: dict) -> None:
    """summary.json and summary.md (stages, then targets), copied to $OUT/gpu-check."""
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# gpu-check ({summary['mode']}) on {summary['gpu']}", "",
             f"commit {summary['commit']}, {summary['date']}, {summary['total_s']} s", "",
             "| stage | status | seconds | log |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s.get('log', '')} |"
              for s in summary["stages"]]
    if summary.get("error"):
        lines += ["", f"gpu-check itself failed: {summary['error']}"]
    lines += ["", "## Targets (issue 18; benchmarks, not tests)", "",
              "| case | target | impl | value | status |", "|---|---|---|---|---|"]
    lines += [f"| {t['case']} | {t['target']} | {t['impl']} | "
              f"{'-' if t['value'] is None else t['value']} | {t['status']} |"
              for t in summary["targets"]]
    (results / "summary.md").write_text("\n".join(lines) + "\n")
    if os.environ.get("OUT"):
        shutil.copytree(results, Path(os.environ["OUT"]) / "gpu-check", dirs_exist_ok=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--dry", action="store_true", help="dry mode even if a GPU is present")
    ap.add_argument("--no-build", action="store_true", help="use the extension as built")
    ap.add_argument("--python", default=DEFAULT_PY)
    ap.add_argument("--total", type=float, default=470, help="seconds for all stages")
    ap.add_argument("--results", type=Path, help="default: benchmarks/results/gpu-check-<gpu>"
                                                 " (dry: build/gpu-check-dry)")
    a = ap.parse_args(argv)
    t_start = time.time()
    smi = tool_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                       "compute_cap", "--format=csv,noheader"])
    gpu = bool(smi) and not a.dry
    mode = "gpu" if gpu else "dry"
    gpu_name = smi.splitlines()[0].split(",")[0].strip() if gpu else "dry"
    results = a.results or (ROOT / "benchmarks" / "results" / f"gpu-check-{slug(gpu_name)}"
                            if gpu else ROOT / "build" / "gpu-check-dry")
    results.mkdir(parents=True, exist_ok=True)
    r = Runner(results, a.total)
    info = {"mode": mode, "gpu": gpu_name, "date": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "nvidia_smi": smi,
            "nvcc": tool_output(["nvcc", "--version"]),
            "compute_sanitizer": tool_output(["compute-sanitizer", "--version"]),
            "nproc": os.cpu_count(), "python_for_stages": a.python,
            "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip() or None}
    summary = {"mode": mode, "gpu": gpu_name, "commit": info["commit"], "date": info["date"]}
    bench = None
    try:
        path = stages(a, r, info, gpu, results)
        if path.exists():
            bench = json.loads(path.read_text())
    except BaseException as exc:  # the summary says so, then the error propagates
        summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        summary.update(total_s=round(time.time() - t_start, 1), stages=r.stages,
                       targets=evaluate_targets(bench))
        write_summary(results, summary)
    print(f"gpu-check: {mode} mode done in {summary['total_s']} s, results in {results}")
    return 1 if any(s["status"] in ("failed", "timeout") for s in r.stages) else 0


if __name__ == "__main__":
    sys.exit(main())
