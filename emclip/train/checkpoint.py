"""Atomic, resumable checkpoints that load without unpickling code.

A checkpoint is a folder ``step_000123/`` holding

* ``model.safetensors``  — the model's state dict without its frozen parts (a frozen pretrained trunk and text
  transformer are ~100 MB that never change: they are rebuilt from the model config, and ``meta.json`` keeps a
  digest of them so that loading against different frozen weights fails loudly);
* ``state.pt``           — optimizer, scheduler, RNG states and counters, loaded with ``torch.load(weights_only=True)``;
* ``meta.json``          — step, epoch, batch-in-epoch, metrics, the resolved configuration.

It is written into a temporary folder, flushed and renamed into place, and only then does ``latest`` (a one-line
text file, itself replaced atomically) point at it. A run killed at any moment leaves either the previous
checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import ast
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..paths import write_text_atomic  # noqa: F401 - re-exported: the training modules write through it


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": repr(random.getstate())}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))   # stored as text: weights_only loading accepts it


def _frozen_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys that training never changes: parameters without gradient, and every key (buffers too) of a
    module whose parameters are all frozen (e.g. batch-norm statistics of a frozen trunk)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for mod_name, module in model.named_modules():
        params = list(module.parameters())
        if mod_name and params and not any(p.requires_grad for p in params):
            frozen.update(f"{mod_name}.{k}" for k in module.state_dict())
    return frozen


def frozen_digest(model: torch.nn.Module) -> str:
    import hashlib
    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(_frozen_keys(model)):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(ckpt_root: Path, model: torch.nn.Module, optimizer, scheduler, meta: dict,
                    keep: int = 2, protect: tuple[str, ...] = ("best",)) -> Path:
    """Write ``ckpt_root/step_XXXXXX`` atomically and point ``latest`` at it; prune older step folders."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{int(meta['step']):06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=ckpt_root))
    try:
        frozen = _frozen_keys(model)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in frozen}
        save_file(state, str(tmp / "model.safetensors"))
        meta = dict(meta, frozen_digest=frozen_digest(model), frozen_keys=len(frozen))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = ckpt_root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(ckpt_root / "latest", name + "\n")
    _prune(ckpt_root, keep, protect)
    return final


def copy_as(ckpt_root: Path, source: Path, alias: str) -> Path:
    """Atomically replace ``ckpt_root/alias`` (e.g. ``best``) with a copy of a step checkpoint."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.", dir=ckpt_root))
    for f in Path(source).iterdir():
        shutil.copy2(f, tmp / f.name)
    old = ckpt_root / alias
    if old.exists():
        trash = ckpt_root / f".{alias}.old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(old, trash)
        os.replace(tmp, old)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, old)
    return old


def _prune(ckpt_root: Path, keep: int, protect: tuple[str, ...]) -> None:
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".step_*"):      # temporary folders of a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = Path(ckpt_root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(ckpt_root) / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load a checkpoint into a model built from the same config; its frozen parts must match the saved digest."""
    ckpt = Path(ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    meta = json.loads((ckpt / "meta.json").read_text())
    missing, unexpected = model.load_state_dict(state, strict=False)
    stray = sorted(set(missing) - _frozen_keys(model))
    if unexpected or stray:
        raise RuntimeError(f"{ckpt}: checkpoint does not fit the model: unexpected keys {unexpected[:5]}, "
                           f"missing trainable keys {stray[:5]}")
    if meta.get("frozen_digest") not in (None, frozen_digest(model)):
        raise RuntimeError(f"{ckpt}: the model's frozen weights differ from those the run trained with "
                           f"(digest {frozen_digest(model)} vs {meta['frozen_digest']}); build the model from the "
                           f"run's config.json with the same weight packages")


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer=None, scheduler=None) -> dict:
    """Restore model (and optimizer, scheduler, RNG when given); returns the checkpoint's meta."""
    load_model_weights(model, ckpt)
    if optimizer is not None or scheduler is not None:
        state = torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    return json.loads((Path(ckpt) / "meta.json").read_text())
