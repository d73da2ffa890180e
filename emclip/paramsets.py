"""Named parameter sets (``params/*.yaml``): which one a notebook uses, its sections, its report folder."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from .paths import project_root
from .train.config import TrainConfig, load_config, params_file

DEFAULT_PARAMS = "demo"


def params_name(params: str | None) -> str:
    """The parameter set a notebook uses: its ``params`` argument, else $EMCLIP_PARAMS, else ``demo``."""
    return params or os.environ.get("EMCLIP_PARAMS") or DEFAULT_PARAMS


def load_params(params: str | None) -> dict:
    """The whole parameter set (data, train, ablations, evaluation sections) as a dict."""
    path = params_file(params_name(params))
    if not path.is_file():
        raise FileNotFoundError(f"parameter set {params_name(params)!r} not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    raw.setdefault("name", path.stem)
    return raw


def train_config(params: str | None, **given) -> TrainConfig:
    """The parameter set's training configuration with every notebook parameter that is not None applied."""
    return load_config(params_file(params_name(params)), {k: v for k, v in given.items() if v is not None})


def report_dir(params: str | None, sub: str | None = None) -> Path:
    """``reports/<parameter set name>[/sub]``, created."""
    path = project_root() / "reports" / load_params(params)["name"]
    path = path / sub if sub else path
    path.mkdir(parents=True, exist_ok=True)
    return path
