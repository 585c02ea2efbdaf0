"""Opt-in: the package builds as a wheel and the installed wheel works in a clean venv.

Not run by ``make test`` (it compiles the extension again and installs torch into a new
venv: minutes). Run with::

    MDP_PACKAGING_TEST=1 .venv/bin/python -m pytest -q tests/test_packaging.py
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("MDP_PACKAGING_TEST") != "1",
                                reason="opt-in: set MDP_PACKAGING_TEST=1 (minutes)")
ROOT = Path(__file__).resolve().parent.parent
SMOKE = """
import torch, mdp_kernels as mk
assert "cpu" in mk.available_backends("cpu"), mk.available_backends("cpu")
f = torch.nn.functional.normalize(torch.randn(2, 8, 4, 4), dim=1).requires_grad_()
p = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
y = torch.randint(0, 5, (2, 4, 4))
a = mk.prototype_contrast_loss(f, p, y, backend="cpu")
b = mk.prototype_contrast_loss(f, p, y, backend="reference")
torch.testing.assert_close(a, b)
a.backward()
print("ok", mk.__version__, mk.__file__)
"""


def sh(*cmd, cwd=None):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-3000:]}{out.stderr[-3000:]}"
    return out.stdout


def test_wheel_installs_and_runs_in_a_clean_venv(tmp_path):
    sh(sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
       str(tmp_path / "dist"), str(ROOT))
    wheel, = (tmp_path / "dist").glob("mdp_kernels-*.whl")
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", str(venv))
    py = str(venv / "bin" / "python")
    sh(py, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}")
    sh(py, "-m", "pip", "install", "-q", str(wheel))
    out = sh(py, "-c", SMOKE, cwd=str(tmp_path))  # not the source tree: the installed wheel
    assert out.startswith("ok") and str(venv) in out
    assert "usage" in sh(str(venv / "bin" / "mdp-train"), "--help").lower()
