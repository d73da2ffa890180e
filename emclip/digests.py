"""Content digests shared by the caches and checkpoints: of a file's bytes, and of named tensors (a state dict)."""
from __future__ import annotations

import hashlib
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


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]], algorithm: str = "sha256") -> str:
    """Digest of (name, tensor) pairs in the order given: names and raw bytes, so equal weights give equal digests
    on every process and device."""
    h = hashlib.new(algorithm)
    for name, tensor in named:
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
