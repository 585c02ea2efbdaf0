"""Timing, peak-memory and machine-description helpers for the benchmark runner."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def median_time(fn: Callable[[], object], device: torch.device, *, warmup: int = 1,
                min_reps: int = 3, max_reps: int = 50, budget_s: float = 1.0) -> tuple[float, int]:
    """Median wall time of ``fn()`` in seconds, and the number of timed repeats.

    ``warmup`` untimed calls first (compilation, allocator and cache warm-up); then as many
    repeats as fit in ``budget_s`` (within ``[min_reps, max_reps]``). On CUDA each repeat is
    timed with CUDA events; on CPU with ``time.perf_counter``.
    """
    cuda = torch.device(device).type == "cuda"
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    est = (time.perf_counter() - t0) / max(warmup, 1)
    reps = int(min(max_reps, max(min_reps, budget_s / max(est, 1e-6))))
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times), reps


def gemm_peak(device: torch.device, dtype: torch.dtype, *, n: int, budget_s: float) -> float:
    """FLOP/s of one square ``n x n @ n x n`` matmul of ``dtype`` (median): the machine's
    GEMM peak in this run, that every op's matrix-product throughput is compared with."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t, _ = median_time(lambda: a @ b, device, budget_s=budget_s)
    return 2 * n ** 3 / t


def cuda_peak_extra(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated while ``fn()`` runs, above what was allocated before (bytes).
    Call after a warm-up so that one-time allocations are not counted."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (a read plus a write per byte)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t, _ = median_time(lambda: dst.copy_(src), device, budget_s=0.5)
    return 2 * nbytes / t


def cpu_peak_extra(case: dict, impl: str, threads: int, timeout: float = 1800) -> int:
    """Growth of VmHWM (bytes) while one call of ``impl`` runs, in a fresh subprocess.

    A fresh process because the high-water mark of a forked child starts at its parent's.
    Allocations of 128 KiB and more are forced onto mmap so that memory freed by the warm-up
    call goes back to the OS and cannot hide the measured call's growth.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "benchmarks.memprobe", json.dumps(case), impl, str(threads)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed for {impl} {case}:\n{out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["growth"])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict:
    """Machine, versions, commit and date, for the JSON header."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None
    import mdp_kernels
    return {
        "machine": {"cpu": _cpu_model(), "cores": cores(), "gpu": gpu,
                    "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "triton": triton_version,
                     "python": platform.python_version(), "mdp_kernels": mdp_kernels.__version__,
                     "cuda": torch.version.cuda},
        "git": {"commit": _git("rev-parse", "HEAD"),
                "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
