"""Atomic, resumable, verified checkpoints that load without unpickling code.

A checkpoint is a folder ``step_000123/`` holding

* ``model.safetensors``  — the model's state dict without its frozen parts (a frozen pretrained trunk and text
  transformer are ~100 MB that never change: they are rebuilt from the model config, and ``meta.json`` keeps a
  digest of them so that loading against different frozen weights fails loudly);
* ``state.pt``           — optimizer, scheduler, RNG states and counters, loaded with ``torch.load(weights_only=True)``;
* ``meta.json``          — step, epoch, batch-in-epoch, metrics, the resolved configuration, the SHA-256 of the two
  files above, and ``best_step``: the step of the run's best checkpoint so far (``is_best`` when it is this one).

It is written into a temporary folder, flushed and renamed into place, and only then does ``latest`` (a one-line
text file, itself replaced atomically) point at it. A run killed at any moment leaves either the previous
checkpoint or the new one, never half of one.

``best/`` is a copy of the step named by ``best_step``, made after that step is written. Until ``best/`` holds it,
that step folder is never pruned, so a kill between the two loses nothing: resuming re-creates ``best/``
(:func:`ensure_best`) and evaluation finds the recorded best step (:func:`best_checkpoint`).

Every read verifies the checksums (checkpoints written before checksums existed are still read, their safetensors
header checked). A damaged latest checkpoint is skipped for the newest intact one, saying so; when none is intact
the error names the folder and the problem.
"""
from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..digests import file_sha256, tensors_digest
from ..paths import atomic_directory, write_text_atomic  # noqa: F401 - re-exported: the training modules write through it

CHECKSUMMED = ("model.safetensors", "state.pt")
_STEP = re.compile(r"step_\d+")


class CheckpointError(RuntimeError):
    """A checkpoint is damaged (checksum mismatch, truncated, unreadable) or missing where one is required."""


def step_name(step: int) -> str:
    return f"step_{int(step):06d}"


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
    """Digest of the frozen weights and buffers. Hashing them (~100 MB with the text tower) took 0.3 s at every
    checkpoint; it is recomputed only when one of those tensors was replaced or written in place since (each
    tensor's storage address and version counter, which every in-place write bumps, key the stored digest)."""
    state = model.state_dict()
    keys = sorted(_frozen_keys(model))
    stamp = tuple((key, state[key].data_ptr(), state[key]._version, tuple(state[key].shape)) for key in keys)
    memo = getattr(model, "_emclip_frozen_digest", None)
    if memo is not None and memo[0] == stamp:
        return memo[1]
    digest = tensors_digest((key, state[key]) for key in keys)[:16]
    object.__setattr__(model, "_emclip_frozen_digest", (stamp, digest))
    return digest


# ---------------------------------------------------------------------------------------------------- verification

def read_meta(ckpt: Path) -> dict | None:
    """A checkpoint's ``meta.json``, or None when it is missing or not a JSON object with a step."""
    try:
        meta = json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("step"), int) else None


def checkpoint_problem(ckpt: Path, files: tuple[str, ...] = CHECKSUMMED) -> str | None:
    """None when the checkpoint folder is intact; else what is wrong, e.g. ``model.safetensors checksum mismatch``.

    ``files`` are the files that must be intact (evaluation needs only the weights). A checkpoint written before
    checksums were recorded passes when its files exist and its safetensors header parses."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return "the folder is missing"
    if not (ckpt / "meta.json").is_file():
        return "meta.json is missing"
    meta = read_meta(ckpt)
    if meta is None:
        return "meta.json cannot be parsed"
    sums = meta.get("checksums") or {}
    for name in files:
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if name in sums:
            if file_sha256(path) != sums[name]:
                return f"{name} checksum mismatch"
        elif name == "model.safetensors":
            try:
                with safe_open(str(path), "pt") as fh:
                    fh.keys()
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                return f"model.safetensors cannot be parsed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """Step folders, oldest first."""
    return sorted(p for p in Path(ckpt_root).glob("step_*") if p.is_dir() and _STEP.fullmatch(p.name))


def find_checkpoint(ckpt_root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest intact checkpoint, [(damaged checkpoint, problem), ...] skipped on the way), reading only.

    The candidate order is the one ``latest`` names, then older step folders, newest first; without a ``latest``
    pointer, every step folder newest first."""
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / "latest"
    named = None
    if pointer.is_file():
        text = pointer.read_text(errors="replace").strip()
        named = ckpt_root / text if _STEP.fullmatch(text) else None
        if named is None:
            return _first_intact(list(reversed(_step_dirs(ckpt_root))), [(pointer, f"it names {text[:40]!r}")])
    steps = list(reversed(_step_dirs(ckpt_root)))
    if named is None:
        return _first_intact(steps, [])
    return _first_intact([named] + [p for p in steps if p.name < named.name], [])


def _first_intact(candidates: list[Path], damaged: list) -> tuple[Path | None, list[tuple[Path, str]]]:
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def _damage_report(damaged: list[tuple[Path, str]]) -> str:
    return "; ".join(f"checkpoint {path} is missing" if why == "the folder is missing" else
                     f"checkpoint {path} is damaged ({why})" for path, why in damaged)


def latest_checkpoint(ckpt_root: Path, log=None) -> Path | None:
    """The newest intact checkpoint (None when there is none at all).

    A damaged one is skipped with a message (``log``, else a warning) naming it and the checkpoint used instead;
    when checkpoints exist but none is intact, :class:`CheckpointError` names them."""
    found, damaged = find_checkpoint(ckpt_root)
    if damaged:
        if found is None:
            raise CheckpointError(f"{_damage_report(damaged)}, and no intact older checkpoint exists in {ckpt_root}; "
                                  f"choose another run_dir, or delete {ckpt_root} to start the run over")
        _say(log, f"{_damage_report(damaged)}; using {found.name}")
    return found


def _best_state(ckpt_root: Path, best_step: int | None, files: tuple[str, ...]) -> str | None:
    """None when ``best/`` is intact and holds ``best_step`` (or later); else what is wrong with it."""
    best = Path(ckpt_root) / "best"
    if not best.exists():
        return "missing"
    problem = checkpoint_problem(best, files)
    if problem is not None:
        return f"damaged ({problem})"
    held = read_meta(best)["step"]
    if best_step is not None and held < best_step:
        return f"older (step {held}) than the run's best (step {best_step})"
    return None


def best_checkpoint(ckpt_root: Path, log=None) -> Path:
    """The run's best checkpoint for evaluation: ``best/``, or — when ``best/`` is missing, damaged or older than the
    step the run recorded as best (a run killed between writing that step and copying it) — that step folder, with a
    message saying which one is used. Raises :class:`CheckpointError` when no best checkpoint can be found; never
    falls back to the latest one silently."""
    ckpt_root = Path(ckpt_root)
    best = ckpt_root / "best"
    latest = latest_checkpoint(ckpt_root, log)
    best_step = (read_meta(latest) or {}).get("best_step") if latest is not None else None
    why = _best_state(ckpt_root, best_step, ("model.safetensors",))
    if why is None:
        return best
    if best_step is not None:
        source = ckpt_root / step_name(best_step)
        source_problem = checkpoint_problem(source, ("model.safetensors",))
        if source_problem is None:
            _say(log, f"{best} is {why}; using {source}, which the run recorded as its best (step {best_step})")
            return source
        why += f", and the recorded best {source} is unusable ({source_problem})"
    raise CheckpointError(f"{best} is {why}: this run has no usable best checkpoint; evaluate its latest checkpoint "
                          f"({latest or 'none'}) explicitly, or resume training until an epoch ends")


def resolve_checkpoint(ckpt_root: Path, which: str = "best", log=None) -> Path:
    """The checkpoint evaluation loads: ``best`` (:func:`best_checkpoint`), ``latest`` or a folder name such as
    ``step_000012``; verified, never substituted without a message."""
    ckpt_root = Path(ckpt_root)
    if which == "best":
        return best_checkpoint(ckpt_root, log)
    if which == "latest":
        found = latest_checkpoint(ckpt_root, log)
        if found is None:
            raise CheckpointError(f"{ckpt_root} has no checkpoint: train the run first")
        return found
    path = ckpt_root / which
    problem = checkpoint_problem(path, ("model.safetensors",))
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged or absent ({problem})")
    return path


def _say(log, message: str) -> None:
    if log is None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    else:
        log(message)


# ---------------------------------------------------------------------------------------------------------- writing

def save_checkpoint(ckpt_root: Path, model: torch.nn.Module, optimizer, scheduler, meta: dict,
                    keep: int = 2) -> Path:
    """Write ``ckpt_root/step_XXXXXX`` atomically and point ``latest`` at it; prune older step folders (never the
    one ``meta['best_step']`` names while ``best/`` does not hold it yet)."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = step_name(meta["step"])
    final = ckpt_root / name
    with atomic_directory(final) as tmp:
        frozen = _frozen_keys(model)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in frozen}
        save_file(state, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "state.pt")
        meta = dict(meta, frozen_digest=frozen_digest(model), frozen_keys=len(frozen),
                    checksums={f: file_sha256(tmp / f) for f in CHECKSUMMED})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")   # last: it vouches for the rest
    write_text_atomic(ckpt_root / "latest", name + "\n")
    _prune(ckpt_root, keep, meta.get("best_step"))
    return final


def copy_as(ckpt_root: Path, source: Path, alias: str) -> Path:
    """Atomically replace ``ckpt_root/alias`` (e.g. ``best``) with a copy of a step checkpoint."""
    target = Path(ckpt_root) / alias
    with atomic_directory(target) as tmp:
        for f in Path(source).iterdir():
            shutil.copy2(f, tmp / f.name)
    return target


def _best_held(ckpt_root: Path) -> int | None:
    """The step ``best/`` holds (from its meta.json, unverified: for pruning decisions only)."""
    return (read_meta(Path(ckpt_root) / "best") or {}).get("step")


def _prune(ckpt_root: Path, keep: int, best_step: int | None = None) -> None:
    held = _best_held(ckpt_root)
    pending = step_name(best_step) if best_step is not None and (held is None or held < best_step) else None
    steps = _step_dirs(ckpt_root)
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != pending:                  # the best step stays until best/ holds a copy of it
            shutil.rmtree(old, ignore_errors=True)
    for stale in [*ckpt_root.glob(".step_*"), *ckpt_root.glob(".best.*")]:   # temporary folders of a killed run
        shutil.rmtree(stale, ignore_errors=True)


def ensure_best(ckpt_root: Path, meta: dict, log=print) -> None:
    """On resume: when ``best/`` is missing, damaged or older than the step ``meta`` records as best (a run killed
    after writing that step, before copying it), re-create ``best/`` from that step, saying so."""
    best_step = meta.get("best_step")
    if best_step is None:
        return
    ckpt_root = Path(ckpt_root)
    why = _best_state(ckpt_root, best_step, CHECKSUMMED)
    if why is None:
        return
    best, source = ckpt_root / "best", ckpt_root / step_name(best_step)
    source_problem = checkpoint_problem(source)
    if source_problem is None:
        copy_as(ckpt_root, source, "best")
        log(f"{best} was {why}; re-created it from {source.name}, which the run recorded as its best")
    else:
        log(f"warning: {best} is {why} and the run's best {source} is unusable ({source_problem}); "
            f"{best} is written again when an epoch improves on the recorded best")


def set_aside_damaged(ckpt_root: Path, damaged: list[tuple[Path, str]]) -> list[Path]:
    """Rename damaged step folders to ``damaged-step_XXXXXX`` (kept for inspection, out of resume and pruning)."""
    moved = []
    for path, _ in damaged:
        if path.is_dir() and _STEP.fullmatch(path.name):
            target = path.with_name(f"damaged-{path.name}")
            n = 1
            while target.exists():
                target, n = path.with_name(f"damaged-{path.name}.{n}"), n + 1
            os.replace(path, target)
            moved.append(target)
    return moved


def prepare_resume(ckpt_root: Path, log=print, found: tuple | None = None) -> Path | None:
    """Main process, before resuming: pick the newest intact checkpoint, set damaged newer ones aside (saying
    which, and which checkpoint the run resumes from), point ``latest`` at it and make sure ``best/`` is current.
    ``found`` is :func:`find_checkpoint`'s answer when the caller already has it."""
    ckpt_root = Path(ckpt_root)
    found, damaged = find_checkpoint(ckpt_root) if found is None else found
    if damaged and found is None:
        raise CheckpointError(f"{_damage_report(damaged)}, and no intact older checkpoint exists in {ckpt_root}; "
                              f"choose another run_dir, or delete {ckpt_root} to start the run over")
    if damaged:
        moved = set_aside_damaged(ckpt_root, damaged)
        kept = f" (kept as {', '.join(p.name for p in moved)})" if moved else ""
        log(f"{_damage_report(damaged)}; resuming from {found.name}{kept}")
    if found is None:
        return None
    pointer = ckpt_root / "latest"
    if not pointer.is_file() or pointer.read_text(errors="replace").strip() != found.name:
        write_text_atomic(pointer, found.name + "\n")
    ensure_best(ckpt_root, read_meta(found), log)
    return found


# ---------------------------------------------------------------------------------------------------------- loading

def _load_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError carries no path
        raise CheckpointError(f"{path} cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                              ) from err


def load_model_weights(model: torch.nn.Module, ckpt: Path, verify: bool = True) -> None:
    """Load a checkpoint into a model built from the same config; its frozen parts must match the saved digest.
    With ``verify``, the weights' checksum is checked first (:class:`CheckpointError` naming the folder)."""
    ckpt = Path(ckpt)
    if verify:
        problem = checkpoint_problem(ckpt, ("model.safetensors",))
        if problem is not None:
            raise CheckpointError(f"checkpoint {ckpt} is damaged ({problem})")
    state = _load_safetensors(ckpt / "model.safetensors")
    meta = read_meta(ckpt) or {}
    missing, unexpected = model.load_state_dict(state, strict=False)
    stray = sorted(set(missing) - _frozen_keys(model))
    if unexpected or stray:
        raise RuntimeError(f"{ckpt}: checkpoint does not fit the model: unexpected keys {unexpected[:5]}, "
                           f"missing trainable keys {stray[:5]}")
    if meta.get("frozen_digest") not in (None, frozen_digest(model)):
        raise RuntimeError(f"{ckpt}: the model's frozen weights differ from those the run trained with "
                           f"(digest {frozen_digest(model)} vs {meta['frozen_digest']}); build the model from the "
                           f"run's config.json with the same weight packages")


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer=None, scheduler=None, verify: bool = True) -> dict:
    """Restore model (and optimizer, scheduler, RNG when given); returns the checkpoint's meta."""
    ckpt = Path(ckpt)
    if verify:
        files = CHECKSUMMED if optimizer is not None or scheduler is not None else ("model.safetensors",)
        problem = checkpoint_problem(ckpt, files)
        if problem is not None:
            raise CheckpointError(f"checkpoint {ckpt} is damaged ({problem})")
    load_model_weights(model, ckpt, verify=False)
    if optimizer is not None or scheduler is not None:
        try:
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling errors carry no path
            raise CheckpointError(f"{ckpt / 'state.pt'} cannot be read ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from err
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    return read_meta(ckpt)
