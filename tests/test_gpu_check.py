"""``make gpu-check`` without a GPU: every stage of tools/gpu_check.py runs in dry mode
(interpreter tests, odd shapes, tiny benchmark preset) and reports ok, under a deadline;
the summary is written when a stage cannot start; the build without ``make``; the issue's
targets evaluated from benchmark results."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools",
                                                                      "gpu_check.py"))
gc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gc)


def test_gpu_check_dry_mode(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--dry",
                          "--no-build", "--python", sys.executable, "--total", "420",
                          "--results", str(tmp_path / "results")],
                         env=env, capture_output=True, text=True, timeout=480)
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert res.returncode == 0, res.stdout[-3000:] + json.dumps(summary["stages"])[-3000:]
    assert summary["mode"] == "dry"
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {"env": "ok", "build": "skipped", "tests": "ok", "memcheck": "ok",
                      "bench": "ok"}
    env_info = json.loads((tmp_path / "results" / "env.json").read_text())
    assert env_info["probe"]["torch"] and "commit" in env_info
    bench = json.loads((tmp_path / "results" / "bench" / "tiny-cpu.json").read_text())
    assert bench["complete"] and bench["results"]
    # the tiny preset has none of the paper's cases
    assert summary["targets"] and all(t["status"] == "not measured (case not in the "
                                      "benchmark results)" for t in summary["targets"])
    assert "## Targets" in (out / "gpu-check" / "summary.md").read_text()


def test_stage_that_cannot_start_fails_and_the_summary_is_written(tmp_path, capsys):
    missing = str(tmp_path / "no-python")
    rc = gc.main(["--dry", "--no-build", "--python", missing, "--total", "60",
                  "--results", str(tmp_path / "r")])
    assert rc == 1
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {"env": "failed", "build": "skipped", "tests": "failed",
                      "memcheck": "failed", "bench": "failed"}
    assert all("cannot start" in s["reason"] for s in summary["stages"]
               if s["stage"] in ("tests", "memcheck", "bench"))
    assert (tmp_path / "r" / "summary.md").exists()


class _Recorder:
    def __init__(self):
        self.cmds = []

    def run(self, name, cmd, deadline, env=None):
        self.cmds.append((name, cmd, env))
        return {"stage": name, "status": "ok"}


def test_build_without_make_makes_the_venv_and_installs(monkeypatch):
    monkeypatch.setattr(gc.shutil, "which", lambda name, path=None: None)
    monkeypatch.setattr(gc.Path, "exists", lambda self: False)
    r = _Recorder()
    gc.build(r, gc.DEFAULT_PY, {"PATH": "/usr/bin"}, 200)
    (n1, venv, _), (n2, pip, env) = r.cmds
    assert n1 == "venv" and venv[1:] == [os.path.join(ROOT, "tools", "make_venv.py"), ".venv"]
    assert n2 == "build" and pip[0] == gc.DEFAULT_PY and pip[-2:] == ["-e", "."]
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(gc.DEFAULT_PY)
    assert env["MAX_JOBS"] == str(os.cpu_count() or 2)
    monkeypatch.setattr(gc.shutil, "which", lambda name, path=None: "/usr/bin/make")
    r = _Recorder()
    gc.build(r, gc.DEFAULT_PY, {"PATH": "/usr/bin"}, 200)
    assert [c for _, c, _ in r.cmds] == [["make", "install"]]


def _row(case, times, mem=None, skipped=None, bw_time=None):
    from benchmarks.run import ratios
    row = {"case": case, "impls": {k: {"time_ms": t, "mem_bytes": (mem or {}).get(k)}
                                   for k, t in times.items()},
           "skipped": skipped or {}, "failed": {}, "floor": {"time_ms": 1.0}}
    if bw_time is not None:
        row["bw_time_ms"] = bw_time
    row["ratios"] = ratios(row)
    return row


def test_targets_pass_fail_and_not_measured():
    pytest.importorskip("torch")
    (_, ce), _ = gc.TARGET_CASES["ce"]
    (_, pool), = gc.TARGET_CASES["pool"]
    mib = gc.MIB
    bench = {"results": [
        # triton: 2.5x eager, 1.2x Liger, 2x floor, 40 MiB; cuda: 1.5x eager, 100 MiB
        _row(dict(ce), {"eager": 5.0, "liger": 2.4, "triton": 2.0, "cuda": 10 / 3},
             mem={"triton": 40 * mib, "cuda": 100 * mib, "eager": 900 * mib,
                  "liger": 60 * mib}, skipped={"cce": "cut_cross_entropy is not installed"}),
        _row(dict(pool), {"triton": 1.25}, skipped={"cuda": "no cuda kernels"}, bw_time=1.0)]}
    got = {(t["case"].split(",")[-1].strip() if "CE" in t["case"] else "pool",
            t["target"].split(" >=")[0].split(" <=")[0], t["impl"]): (t["value"], t["status"])
           for t in gc.evaluate_targets(bench)}
    assert got["P detached", "speed-up over eager", "triton"] == (2.5, "pass")
    assert got["P detached", "speed-up over eager", "cuda"] == (1.5, "fail")
    assert got["P detached", "speed-up over Liger-Kernel", "triton"] == (1.2, "fail")
    assert got["P detached", "speed-up over Cut Cross-Entropy", "triton"] == (
        None, "not measured (cce: cut_cross_entropy is not installed)")
    assert got["P detached", "time / bf16 GEMM floor", "triton"] == (2.0, "fail")
    assert got["P detached", "extra memory (MiB)", "triton"] == (40.0, "pass")
    assert got["P detached", "extra memory (MiB)", "cuda"] == (100.0, "fail")
    assert got["P with grad", "speed-up over eager", "triton"] == (
        None, "not measured (case not in the benchmark results)")
    assert got["pool", "share of copy bandwidth", "triton"] == (0.8, "pass")
    assert got["pool", "share of copy bandwidth", "cuda"] == (
        None, "not measured (cuda: no cuda kernels)")
    assert all(t["status"] == "not measured (no benchmark results)"
               for t in gc.evaluate_targets(None))
