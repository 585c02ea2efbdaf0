"""Atomic file writes: a reader (a resumed run, the experiment driver skipping finished
units) never sees a half-written checkpoint or result."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def _replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``."""
    _replace(Path(path), lambda tmp: torch.save(obj, tmp))


def write_text(path: str | Path, text: str) -> None:
    """``Path.write_text``, atomically."""
    _replace(Path(path), lambda tmp: tmp.write_text(text))
