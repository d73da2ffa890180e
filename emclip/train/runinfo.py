"""What every run records next to its outputs, and the cohort a run trains on (generated when it is the demo's)."""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch

from .. import __version__
from ..data import load_cohort
from ..paths import project_root
from .checkpoint import write_text_atomic


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


def write_run_info(run: Path, cfg, model, cohort) -> None:
    """``config.json`` (resolved configuration) and ``run_info.json`` (versions, commit, model and data sizes)."""
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
