"""Create the Makefile's virtual environment so that it sees the packages of the Python
that creates it.

``python3 -m venv --system-site-packages`` gives the new venv the site-packages of the
*base* interpreter only. When ``python3`` is itself a venv (a GPU machine's environment with
its CUDA torch), that environment's packages would be invisible and ``make`` would try to
install torch again (offline: fail). So the new venv gets a ``.pth`` file listing the parent
environment's site-packages, after its own: sys.path is the new venv's packages, then the
parent venv's, then the base interpreter's.

    python3 tools/make_venv.py .venv [--without-pip]
"""
from __future__ import annotations

import argparse
import site
import sys
import sysconfig
import venv
from pathlib import Path

PTH = "_mdp_parent_env.pth"


def parent_site_packages() -> list[str]:
    """The site-packages of the running venv; empty when it is not a venv."""
    if sys.prefix == sys.base_prefix:
        return []
    return [p for p in site.getsitepackages() if Path(p).is_dir()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--without-pip", action="store_true")
    a = ap.parse_args(argv)
    venv.create(a.path, system_site_packages=True, with_pip=not a.without_pip, symlinks=True)
    parents = parent_site_packages()
    if parents:
        own = sysconfig.get_path("purelib", vars={"base": str(a.path.resolve()),
                                                  "platbase": str(a.path.resolve())})
        Path(own, PTH).write_text("\n".join(parents) + "\n")
        print(f"{a.path}: also sees {', '.join(parents)} (the venv it was made from)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
