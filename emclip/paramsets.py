"""Named parameter sets (``params/*.yaml``), typed and validated: which one a notebook uses, its sections, its
report folder.

A set has the sections ``train`` (:class:`~emclip.train.config.TrainConfig`: everything a run needs),
``evaluation`` (:class:`~emclip.evaluation.settings.EvaluationConfig`), ``ablations`` (the grid of
:func:`emclip.ablation.grid`), ``hp_search`` (training key -> values tried on validation), ``study``
(:class:`StudyOptions`) and ``inference`` (:class:`~emclip.serving.inference.InferenceConfig`: the cohort of new
patients and the text query of 06). A key no section knows is refused with the list of known ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .evaluation.settings import EvaluationConfig
from .paths import project_root
from .serving.inference import InferenceConfig
from .train.config import TrainConfig, load_config, params_file, parse_overrides

DEFAULT_PARAMS = "demo"
ABLATION_KEYS = ("scale_mode", "aggregator", "scale_embed", "seeds", "scale_attention")


@dataclass(frozen=True)
class StudyOptions:
    workers: int = 1          # arms trained side by side, one thread each


@dataclass(frozen=True)
class ParamSet:
    name: str
    path: Path
    train: TrainConfig
    evaluation: EvaluationConfig = EvaluationConfig()
    ablations: dict = field(default_factory=dict)
    hp_search: dict = field(default_factory=dict)
    study: StudyOptions = StudyOptions()
    inference: InferenceConfig = InferenceConfig()


SECTIONS = tuple(f.name for f in fields(ParamSet) if f.name != "path")


def params_name(params: str | None) -> str:
    """The parameter set a notebook uses: its ``params`` argument, else $EMCLIP_PARAMS, else ``demo``."""
    return params or os.environ.get("EMCLIP_PARAMS") or DEFAULT_PARAMS


def _section(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: section {key!r} must be a mapping, got {type(value).__name__}")
    return value


def load_params(params: str | None) -> ParamSet:
    """The whole parameter set, every section validated (unknown sections and keys are errors)."""
    path = params_file(params_name(params))
    if not path.is_file():
        raise FileNotFoundError(f"parameter set {params_name(params)!r} not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a parameter set is a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        hint = " (the data: section is gone: the cohort is train.data_dir / generate_*)" if "data" in unknown else ""
        raise ValueError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}{hint}")
    train = load_config(path)
    ablations = _section(raw, "ablations", str(path))
    bad = sorted(set(ablations) - set(ABLATION_KEYS))
    if bad:
        raise ValueError(f"{path}: ablations: unknown key(s) {', '.join(bad)}; known: {', '.join(ABLATION_KEYS)}")
    hp_search = _section(raw, "hp_search", str(path))
    for key, values in hp_search.items():   # each value tried must make a valid training configuration
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: hp_search: {key} must be a non-empty list of values, got {values!r}")
        for value in values:
            load_config(path, {key: value})
    study = _section(raw, "study", str(path))
    known = [f.name for f in fields(StudyOptions)]
    if set(study) - set(known):
        raise ValueError(f"{path}: study: unknown key(s) {', '.join(sorted(set(study) - set(known)))}; "
                         f"known: {', '.join(known)}")
    inference = InferenceConfig.from_section(_section(raw, "inference", str(path)), f"{path}: inference")
    if inference.data_path is not None and inference.data_path != train.data_path and inference.generate_cohort \
            and train.generate_cohort and inference.data_seed == train.data_seed:
        raise ValueError(f"{path}: inference.data_seed {inference.data_seed} is the training cohort's seed: a "
                         f"generated cohort of new patients would repeat training patients; choose another seed")
    return ParamSet(name=str(raw.get("name") or path.stem), path=path, train=train,
                    evaluation=EvaluationConfig.from_section(_section(raw, "evaluation", str(path)),
                                                             f"{path}: evaluation"),
                    ablations=ablations, hp_search=hp_search, study=StudyOptions(**study), inference=inference)


def train_config(params: str | None, **given) -> TrainConfig:
    """The parameter set's training configuration with every notebook parameter that is not None applied; a
    notebook's ``overrides`` (``"key=value key=value"``, a list of them or a dict) sets any other training key."""
    values = parse_overrides(given.pop("overrides", None))
    values.update({k: v for k, v in given.items() if v is not None})
    return load_config(params_file(params_name(params)), values)


def report_dir(params: str | None, sub: str | None = None) -> Path:
    """``reports/<parameter set name>[/sub]``, created."""
    path = project_root() / "reports" / load_params(params).name
    path = path / sub if sub else path
    path.mkdir(parents=True, exist_ok=True)
    return path
