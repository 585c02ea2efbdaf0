"""``make gpu-check`` without a GPU: every stage of tools/gpu_check.py runs in dry mode
(interpreter tests, odd shapes, tiny benchmark preset) and reports ok, under a deadline."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_mode(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--dry",
                          "--no-build", "--python", sys.executable, "--total", "240",
                          "--results", str(tmp_path / "results")],
                         env=env, capture_output=True, text=True, timeout=300)
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
    assert (out / "gpu-check" / "summary.md").exists()
