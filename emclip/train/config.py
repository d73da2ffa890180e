"""One training configuration: a named parameter set (``params/*.yaml``) plus ``key=value`` overrides."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from ..data.diagnoses import UNCERTAIN_POLICIES, LabelOptions
from ..loss import LOSS_INIT
from ..model.aggregators import AGGREGATORS, DEFAULT_AGGREGATOR
from ..model.scale import DEFAULT_SCALE_ENCODING, DEFAULT_SCALE_MODE, SCALE_ENCODINGS, SCALE_MODES
from ..model.towers import DEFAULT_MODEL
from ..paths import project_root, resolve, write_text_atomic
from ..synthetic.cohort import DEMO_PATIENTS

MODES = ("cache", "e2e")
PRECISIONS = ("no", "bf16", "fp16")
LOSSES = tuple(LOSS_INIT)
SELECT_ON = ("val_recall", "val_loss")


@dataclass
class TrainConfig:
    # data
    data_dir: str = "data/demo_cohort"       # cohort folder; relative paths resolve against the project root
    generate_cohort: bool = True             # a missing data_dir may be generated as the embedded cohort; off as soon
    #                                          as data_dir is given explicitly (a path the user names is never written)
    generate_patients: int = DEMO_PATIENTS   # size of a generated cohort
    generate_image_size: int = 256           # image side (px) of a generated cohort
    data_seed: int = 0                       # seed of the generated cohort and of seeded splits
    label_vocab: str | None = "renal"        # report labeler vocabulary for patients without a given diagnosis
    #                                          (renal | chexpert | YAML path | None: never label)
    labels_file: str | None = None           # a labels table from `python -m emclip.labels` used instead
    label_uncertain: str = "exclude"         # a diagnosis the report only hedges: exclude it, or count it (positive)
    # model
    model: str = DEFAULT_MODEL               # name of emclip/configs/models/*.json, or a path to a JSON config
    scale_embed: bool = True                 # False: the scale-blind baseline, everything else equal
    scale_encoding: str = DEFAULT_SCALE_ENCODING  # sincos | fourier | binned
    scale_mode: str = DEFAULT_SCALE_MODE     # where the scale enters: add | film | mlp | trunk (ViT, e2e only)
    scale_attention: bool = False            # also condition the gated-attention scorer on the scale
    aggregator: str = DEFAULT_AGGREGATOR     # mean | gated_attention | transformer
    loss: str = "clip"                       # "clip" (InfoNCE) or "siglip"
    lock_text: bool = True                   # freeze the text transformer; its projection still trains
    # head sizes: None keeps the model config's value (its JSON holds the architecture, these resize it for a run)
    scale_range_nm: list | None = None       # [low, high] nm/px the scale encodings span
    scale_dim: int | None = None             # width of the sincos / fourier scale encoding
    scale_max_freq: float | None = None      # sincos: highest frequency
    scale_sigma: float | None = None         # fourier: std of the random frequencies
    scale_bins: int | None = None            # binned: number of log-scale bins
    scale_hidden_dim: int | None = None      # mlp mode: hidden width of the per-image MLP
    attention_hidden_dim: int | None = None  # gated attention: hidden width of the scorer
    attention_dropout: float | None = None
    transformer_layers: int | None = None    # transformer aggregator
    transformer_heads: int | None = None
    transformer_mlp_ratio: float | None = None
    transformer_dropout: float | None = None
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
        if problems:   # the checks below compare values, which needs them typed
            raise ValueError("invalid training configuration: " + "; ".join(problems))
        for name in ("label_vocab", "labels_file"):  # papermill and YAML spell "no value" many ways
            if isinstance(getattr(self, name), str) and getattr(self, name).strip().lower() in ("none", "null", ""):
                setattr(self, name, None)
        for name, allowed in (("mode", MODES), ("precision", PRECISIONS), ("aggregator", AGGREGATORS),
                              ("scale_encoding", SCALE_ENCODINGS), ("scale_mode", SCALE_MODES), ("loss", LOSSES),
                              ("select_on", SELECT_ON), ("label_uncertain", UNCERTAIN_POLICIES)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("epochs", "batch_size", "accum_freq", "num_processes", "checkpoint_every", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("scale_dim", "scale_bins", "scale_hidden_dim", "attention_hidden_dim", "transformer_layers",
                     "transformer_heads"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 or null, got {getattr(self, name)}")
        for name in ("attention_dropout", "transformer_dropout"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} must be in [0, 1) or null, got {getattr(self, name)}")
        if self.scale_range_nm is not None and not (
                isinstance(self.scale_range_nm, (list, tuple)) and len(self.scale_range_nm) == 2
                and 0 < float(self.scale_range_nm[0]) < float(self.scale_range_nm[1])):
            problems.append(f"scale_range_nm must be [low, high] with 0 < low < high, got {self.scale_range_nm}")
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
    data_path = property(lambda self: resolve(self.data_dir), doc="data_dir as an absolute path")
    run_path = property(lambda self: resolve(self.run_dir), doc="run_dir as an absolute path")
    cache_path = property(lambda self: resolve(self.cache_dir), doc="cache_dir as an absolute path")

    def label_options(self) -> LabelOptions:
        """How the cohort derives missing diagnoses from reports (cached beside the feature cache)."""
        return LabelOptions(self.label_vocab, resolve(self.labels_file) if self.labels_file else None,
                            self.label_uncertain, self.cache_path)

    def model_overrides(self) -> dict:
        """What this run sets in the model config: its choices, and the head sizes it gives (``None`` keeps the
        JSON's)."""
        scale = {"enabled": self.scale_embed, "mode": self.scale_mode, "encoding": self.scale_encoding,
                 "attention": self.scale_attention, "range_nm": self.scale_range_nm,
                 "sincos": {"dim": self.scale_dim, "max_freq": self.scale_max_freq},
                 "fourier": {"dim": self.scale_dim, "sigma": self.scale_sigma},
                 "binned": {"bins": self.scale_bins}, "mlp": {"hidden_dim": self.scale_hidden_dim}}
        aggregator = {"name": self.aggregator,
                      "gated_attention": {"hidden_dim": self.attention_hidden_dim, "dropout": self.attention_dropout},
                      "transformer": {"layers": self.transformer_layers, "heads": self.transformer_heads,
                                      "mlp_ratio": self.transformer_mlp_ratio, "dropout": self.transformer_dropout}}
        return _without_none({"scale": scale, "aggregator": aggregator, "loss": self.loss,
                              "lock_image": self.mode == "cache", "lock_text": self.lock_text})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _without_none(d: dict) -> dict:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


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
            elif kind.startswith("list"):
                parsed = yaml.safe_load(value)
                if not isinstance(parsed, list):
                    raise ValueError
                setattr(cfg, f.name, parsed)
        except ValueError:
            problems.append(f"{f.name}={value!r} is not a valid {kind}")
    return problems


def _parse_value(text: str):
    """``key=value`` values are YAML scalars: true/false, numbers, null, or strings."""
    return yaml.safe_load(text) if text.strip() else ""


def parse_overrides(items: str | list[str] | dict | None) -> dict:
    """``key=value`` overrides as a dict: from a list of them, one space-separated string, or a dict."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    if isinstance(items, str):
        items = items.split()
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
