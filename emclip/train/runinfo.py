"""What every run records next to its outputs, and the cohort a run trains on (generated when it is the demo's)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
from dataclasses import fields
from pathlib import Path

import torch

from .. import __version__
from ..data import load_cohort
from ..paths import project_root, resolve
from .checkpoint import read_meta, write_text_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs are not locked
    fcntl = None

# Keys that may change when a run is resumed: they decide where caches live, how fast data is read, when to stop
# early or checkpoint, whether a missing demo cohort may be generated, where the run folder is and how notebooks
# launch processes — not what the run computes. Every other key defines the run (``epochs`` too: it sets the length
# of the cosine schedule). The number of processes actually training is compared too (it sets the global batch).
RESUME_SAFE_KEYS = frozenset({"max_steps", "num_workers", "eval_batch_size", "checkpoint_every", "cache_dir",
                              "run_dir", "generate_cohort", "num_processes"})
_PATH_KEYS = ("data_dir", "labels_file")


class RunDirInUse(RuntimeError):
    """Another trainer holds the run folder's lock."""


class IncompatibleResume(ValueError):
    """A run folder holds a run trained with another configuration."""


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True,
                             timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_root(),
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def run_lock(run: Path):
    """Hold ``run/.lock`` exclusively (it records pid and host) while the block runs; raise :class:`RunDirInUse`
    at once when another process holds it. An ``flock`` is released by the kernel when its holder dies, so a
    killed trainer (even ``kill -9``) never leaves a stale lock; the file itself stays and is reused."""
    run = Path(run)
    path = run / ".lock"
    if fcntl is None:  # pragma: no cover
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(path)
            raise RunDirInUse(f"run_dir {run} is in use by pid {holder.get('pid', '?')} on host "
                              f"{holder.get('host', '?')} (lock file {path}); wait for it or choose another "
                              f"run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _comparable(values: dict) -> dict:
    """A configuration as compared on resume: JSON values, paths resolved (``data/x`` and its absolute path agree)."""
    from .config import TrainConfig
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    out = json.loads(json.dumps({**defaults, **values}, default=str))
    for key in _PATH_KEYS:
        if isinstance(out.get(key), str):
            out[key] = str(resolve(out[key]))
    return out


def resume_differences(saved: dict, cfg, processes: int | None = None, saved_processes: int | None = None) -> list[str]:
    """``key: OLD in the run, NEW now`` for every run-defining key that differs (``RESUME_SAFE_KEYS`` may)."""
    old, new = _comparable(saved), _comparable(cfg.to_dict())
    out = [f"{k}: {json.dumps(old.get(k))} in the run, {json.dumps(new.get(k))} now"
           for k in sorted(set(old) | set(new)) if k not in RESUME_SAFE_KEYS and old.get(k) != new.get(k)]
    if processes is not None and saved_processes is not None and processes != saved_processes:
        out.append(f"processes: {saved_processes} in the run, {processes} now")
    return out


def check_resume(run: Path, cfg, resume: Path | None, processes: int | None = None) -> None:
    """Before anything is written: a run folder that already holds a run (``config.json`` or a checkpoint) may only
    be resumed with the configuration it was trained with, up to :data:`RESUME_SAFE_KEYS`. Raises
    :class:`IncompatibleResume` listing every differing key."""
    run = Path(run)
    meta = read_meta(resume) if resume is not None else None
    config_json = run / "config.json"
    sources = []
    if config_json.is_file():
        try:
            saved = json.loads(config_json.read_text())
        except (OSError, ValueError) as err:
            raise IncompatibleResume(f"{config_json} cannot be read ({err}); restore it, or choose another "
                                     f"run_dir") from None
        if not isinstance(saved, dict):
            raise IncompatibleResume(f"{config_json} is not a configuration; restore it, or choose another run_dir")
        sources.append((config_json, saved))
    if meta is not None and isinstance(meta.get("config"), dict):
        sources.append((resume / "meta.json", meta["config"]))
    for source, saved in sources:
        diffs = resume_differences(saved, cfg, processes, (meta or {}).get("processes"))
        if diffs:
            started = resume is not None or any((run / "checkpoints").glob("step_*"))
            hint = "" if started else f"; the run has no checkpoint yet, so deleting {config_json} starts it anew"
            raise IncompatibleResume(f"run_dir {run} holds a run with another configuration ({source}): "
                                     f"{'; '.join(diffs)}; choose a new run_dir, or restore these values to "
                                     f"resume it{hint}")


def write_run_info(run: Path, cfg, model, cohort) -> None:
    """``config.json`` (resolved configuration; written when the run is new, never replaced: :func:`check_resume`
    has made sure a resumed run's configuration agrees with it) and ``run_info.json`` (versions, commit, model and
    data sizes)."""
    if not (run / "config.json").exists():
        cfg.save(run / "config.json")
    info = {"emclip_version": __version__, "git_commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "model_config": model.config,
            "parameters": model.parameter_counts(), "cohort": cohort.summary()}
    write_text_atomic(run / "run_info.json", json.dumps(info, indent=2, default=str) + "\n")


def _has_tables(path: Path) -> bool:
    return any((path / f"{stem}{ext}").is_file() for stem in ("images", "reports") for ext in (".csv", ".parquet", ".pq"))


def ensure_cohort(cfg, accelerator=None, log=print):
    """Load ``cfg.data_dir``. Only the parameter set's own demo path is ever generated, and only into a folder that
    does not exist yet (or is empty): a folder the user names, or one holding anything, is never written to."""
    path = cfg.data_path
    is_main = accelerator is None or accelerator.is_main_process
    if not _has_tables(path):
        empty = not path.exists() or (path.is_dir() and not any(path.iterdir()))
        if not (cfg.generate_cohort and empty):
            why = ("the folder is not empty, so nothing is generated into it" if not empty else
                   "a data_dir you name is never generated into (only a parameter set's own demo cohort is)")
            raise FileNotFoundError(f"data_dir {path} has no cohort tables (images.csv + reports.csv, or .parquet): "
                                    f"{why}. Check the path, or write the tables (README: the data contract).")
        if is_main:
            from ..synthetic import generate_cohort
            log(f"{path} does not exist: generating the embedded cohort there ({cfg.generate_patients} patients, "
                f"seed {cfg.data_seed})")
            generate_cohort(path, cfg.generate_patients, seed=cfg.data_seed, image_size=cfg.generate_image_size)
        if accelerator is not None:
            accelerator.wait_for_everyone()
    return load_run_cohort(cfg)


def load_run_cohort(cfg, check_images: str = "exists"):
    """The cohort a configuration names, with its diagnoses derived as the configuration says."""
    return load_cohort(cfg.data_path, check_images=check_images, seed=cfg.data_seed, labels=cfg.label_options())
