"""Content digests shared by the caches and checkpoints: of a file's bytes, of named tensors (a state dict), and a
file's identity (what tells, without reading it, that a file may have changed since it was hashed)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import torch


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file, read in chunks (checkpoints and feature files are too large to read at once)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_identity(path: str | Path) -> list[int]:
    """[size, mtime, ctime, inode] from one ``stat``. Any write into the file changes its ctime, which (unlike the
    mtime) cannot be set back, so an unchanged identity means the bytes hashed last time are still there; a copy or
    a move gets another identity and is hashed again."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]], algorithm: str = "sha256") -> str:
    """Digest of (name, tensor) pairs in the order given: names and raw bytes, so equal weights give equal digests
    on every process and device."""
    h = hashlib.new(algorithm)
    for name, tensor in named:
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
