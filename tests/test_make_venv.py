"""tools/make_venv.py (the Makefile's venv): made from a Python that is itself a venv, the
new venv sees that venv's packages (a GPU machine's torch), after its own."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def site_packages(py):
    return subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_venv_from_a_venv_sees_its_packages(tmp_path):
    parent, child = tmp_path / "parent", tmp_path / "child"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(parent)], check=True)
    ppy = str(parent / "bin" / "python")
    with open(os.path.join(site_packages(ppy), "mdp_parent_probe.py"), "w") as f:
        f.write("WHERE = 'parent'\n")
    subprocess.run([ppy, os.path.join(ROOT, "tools", "make_venv.py"), str(child),
                    "--without-pip"], check=True, capture_output=True)
    cpy = str(child / "bin" / "python")
    with open(os.path.join(site_packages(cpy), "mdp_child_probe.py"), "w") as f:
        f.write("WHERE = 'child'\n")
    got = subprocess.run([cpy, "-c", "import sys, mdp_parent_probe, mdp_child_probe; "
                          "print(mdp_parent_probe.WHERE, mdp_child_probe.WHERE); "
                          "print(sys.path.index(mdp_child_probe.__file__.rsplit('/', 1)[0]) < "
                          "sys.path.index(mdp_parent_probe.__file__.rsplit('/', 1)[0]))"],
                         capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["parent", "child", "True"]


def test_venv_from_a_plain_python_has_no_parent_file(tmp_path):
    base = subprocess.run([sys.executable, "-c", "import sys; print(sys.base_prefix)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    py = os.path.join(base, "bin", "python3")
    subprocess.run([py, os.path.join(ROOT, "tools", "make_venv.py"), str(tmp_path / "v"),
                    "--without-pip"], check=True, capture_output=True)
    assert not os.path.exists(os.path.join(site_packages(str(tmp_path / "v" / "bin" / "python")),
                                           "_mdp_parent_env.pth"))
