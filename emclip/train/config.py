"""One training configuration: a named parameter set (``params/*.yaml``) plus ``key=value`` overrides."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from ..data.diagnoses import UNCERTAIN_POLICIES, LabelOptions
from ..paths import project_root, resolve, write_text_atomic

MODES = ("cache", "e2e")
PRECISIONS = ("no", "bf16", "fp16")
AGGREGATORS = ("mean", "gated_attention", "transformer")
SCALE_ENCODINGS = ("sincos", "fourier", "binned")
SCALE_MODES = ("add", "film", "mlp", "trunk")
SELECT_ON = ("val_recall", "val_loss")


@dataclass
class TrainConfig:
    # data
    data_dir: str = "data/demo_cohort"       # cohort folder; relative paths resolve against the project root
    generate_cohort: bool = True             # a missing data_dir may be generated as the embedded cohort; off as soon
    #                                          as data_dir is given explicitly (a path the user names is never written)
    generate_patients: int = 500             # size of a generated cohort
    generate_image_size: int = 256           # image side (px) of a generated cohort
    data_seed: int = 0                       # seed of the generated cohort and of seeded splits
    label_vocab: str | None = "renal"        # report labeler vocabulary for patients without a given diagnosis
    #                                          (renal | chexpert | YAML path | None: never label)
    labels_file: str | None = None           # a labels table from `python -m emclip.labels` used instead
    label_uncertain: str = "exclude"         # a diagnosis the report only hedges: exclude it, or count it (positive)
    # model
    model: str = "efficientnet_lite0_minilm"  # name of emclip/configs/models/*.json, or a path to a JSON config
    scale_embed: bool = True                 # False: the scale-blind baseline, everything else equal
    scale_encoding: str = "sincos"
    scale_mode: str = "mlp"                  # where the scale enters: add | film | mlp | trunk (ViT, e2e only);
    #                                          mlp + mean pooling was chosen on validation by the study (docs/study.md)
    scale_attention: bool = False            # also condition the gated-attention scorer on the scale
    aggregator: str = "mean"
    loss: str = "clip"                       # "clip" (InfoNCE) or "siglip"
    lock_text: bool = True                   # freeze the text transformer; its projection still trains
    # training
    mode: str = "cache"                      # "cache": frozen trunk + feature cache; "e2e": trunk trains too
    epochs: int = 30
    batch_size: int = 32                     # patients per process per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    accum_freq: int = 1                      # micro-batches per step; negatives from all of them are kept
    max_instances: int | None = 16           # images sampled per bag per training step (None: all)
    precision: str = "no"                    # mixed precision: "no", "bf16" or "fp16" (fp16 needs a GPU)
    seed: int = 0
    num_processes: int = 1                   # used by notebook_launcher; `accelerate launch` sets its own
    num_workers: int = 0                     # DataLoader workers for image decoding (e2e mode, cache building)
    # outputs
    run_dir: str = "runs/demo"
    cache_dir: str = "cache"
    select_on: str = "val_recall"            # which epoch becomes checkpoints/best: "val_recall" (mean patient<->report
    #                                          Recall@1/5/10 on validation, label-free) or "val_loss" (lowest)
    checkpoint_every: int = 50               # steps between resumable checkpoints (and one at every epoch end)
    eval_batch_size: int = 64
    max_steps: int | None = None             # stop early after this many optimizer steps (tests, smoke runs)

    def __post_init__(self):
        problems = _coerce_types(self)
        for name in ("label_vocab", "labels_file"):  # papermill and YAML spell "no value" many ways
            if isinstance(getattr(self, name), str) and getattr(self, name).strip().lower() in ("none", "null", ""):
                setattr(self, name, None)
        for name, allowed in (("mode", MODES), ("precision", PRECISIONS), ("aggregator", AGGREGATORS),
                              ("scale_encoding", SCALE_ENCODINGS), ("scale_mode", SCALE_MODES), ("loss", ("clip", "siglip")),
                              ("select_on", SELECT_ON), ("label_uncertain", UNCERTAIN_POLICIES)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("epochs", "batch_size", "accum_freq", "num_processes", "checkpoint_every", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.max_instances is not None and self.max_instances < 1:
            problems.append(f"max_instances must be >= 1 or null, got {self.max_instances}")
        if self.scale_mode == "trunk" and self.mode != "e2e":
            problems.append("scale_mode='trunk' puts the scale inside the image trunk, so its features cannot be "
                            "cached: use mode=e2e (and a ViT model)")
        if self.scale_attention and self.aggregator != "gated_attention":
            problems.append(f"scale_attention=true conditions the gated-attention scorer; aggregator is "
                            f"{self.aggregator!r}")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))

    # paths, resolved against the project root so notebooks work from any working directory
    @property
    def data_path(self) -> Path:
        return resolve(self.data_dir)

    @property
    def run_path(self) -> Path:
        return resolve(self.run_dir)

    @property
    def cache_path(self) -> Path:
        return resolve(self.cache_dir)

    def label_options(self) -> LabelOptions:
        """How the cohort derives missing diagnoses from reports (cached beside the feature cache)."""
        return LabelOptions(self.label_vocab, resolve(self.labels_file) if self.labels_file else None,
                            self.label_uncertain, self.cache_path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce_types(cfg: "TrainConfig") -> list[str]:
    """Accept strings for typed fields (papermill's ``-p scale_embed false`` passes the string "false", which would
    otherwise be truthy); return one message per value that cannot be converted."""
    problems = []
    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        if not isinstance(value, str) or kind.startswith("str"):
            if kind.startswith("bool") and not isinstance(value, bool) and value in (0, 1):
                setattr(cfg, f.name, bool(value))
            continue
        text = value.strip().lower()
        try:
            if kind.startswith("bool"):
                if text not in _TRUE | _FALSE:
                    raise ValueError
                setattr(cfg, f.name, text in _TRUE)
            elif "None" in kind and text in ("none", "null", ""):
                setattr(cfg, f.name, None)
            elif kind.startswith("int"):
                setattr(cfg, f.name, int(text))
            elif kind.startswith("float"):
                setattr(cfg, f.name, float(text))
        except ValueError:
            problems.append(f"{f.name}={value!r} is not a valid {kind}")
    return problems


def _parse_value(text: str):
    """``key=value`` values are YAML scalars: true/false, numbers, null, or strings."""
    return yaml.safe_load(text) if text.strip() else ""


def parse_overrides(items: list[str] | dict | None) -> dict:
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def params_file(name_or_path: str | Path) -> Path:
    """A named parameter set (``demo`` -> ``params/demo.yaml``) or an explicit YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path if path.is_absolute() or path.exists() else resolve(path)
    return project_root() / "params" / f"{name_or_path}.yaml"


def load_config(params: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Defaults <- the parameter set's ``train`` section (or whole file) <- overrides; unknown keys are errors."""
    values: dict = {}
    if params is not None:
        path = params_file(params)
        if not path.is_file():
            raise FileNotFoundError(f"parameter set {params!r} not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        values.update(raw.get("train", raw) if isinstance(raw, dict) else {})
    given = parse_overrides(overrides)
    if "data_dir" in given and "generate_cohort" not in given:
        given["generate_cohort"] = False  # a data_dir named on the command line or in a notebook is the user's
    values.update(given)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return TrainConfig(**values)
