"""Where the project lives, so that notebooks and commands resolve paths the same from any working directory."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def project_root() -> Path:
    """The repository root (the folder holding ``params/``): $EMCLIP_ROOT, else the source checkout of this
    package (editable install), else the current directory."""
    env = os.environ.get("EMCLIP_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "params").is_dir() and (here / "emclip").is_dir():
        return here
    return Path.cwd()


def resolve(path: str | Path) -> Path:
    """Absolute paths stay; relative ones are taken from the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (project_root() / p).resolve()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the new one, never half of either (temp + rename)."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(fh.name, path)
