"""Where the project lives, so that notebooks and commands resolve paths the same from any working directory."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
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


@contextmanager
def atomic_writer(path: str | Path, mode: str = "wb"):
    """A file handle on a temporary file next to ``path`` that replaces ``path`` when the block ends (flushed and
    fsynced first): a reader sees the old file or the new one, never half of either. On an exception the temporary
    file is removed and ``path`` is left as it was."""
    path = Path(path)
    fh = tempfile.NamedTemporaryFile(mode, dir=path.parent, delete=False, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(fh.name, path)
    except BaseException:
        Path(fh.name).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the new one, never half of either (temp + rename)."""
    with atomic_writer(path, "w") as fh:
        fh.write(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """``write_text_atomic`` for bytes."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(path: str | Path):
    """A temporary folder next to ``path`` to fill; when the block ends its files (subfolders included) are fsynced
    and it takes the place of ``path``. A folder already there is renamed aside first and deleted after (folders
    cannot be swapped in one rename), so a kill leaves the old folder, the new one, or ``.NAME.*`` leftovers, never
    a half-written ``path``. On an exception the temporary folder is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        for f in sorted(tmp.rglob("*")):        # subfolders too: files, then each folder's entries
            if f.is_dir():
                fsync_dir(f)
            else:
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            trash = path.with_name(f".{path.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(path, trash)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
