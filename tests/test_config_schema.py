"""One configuration schema: model JSONs hold the architecture, parameter sets hold every choice of a run, every
key is typed and validated, and each default lives in one place."""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from emclip.evaluation.settings import DEFAULT_EVALUATION, EvaluationConfig
from emclip.model import build_model, list_model_configs, load_model_config
from emclip.model.towers import CONFIG_DIR, TRAINING_CHOICES
from emclip.paramsets import SECTIONS, load_params, train_config
from emclip.synthetic.cohort import DEMO_PATIENTS
from emclip.train.config import TrainConfig, load_config
from emclip.train.loop import build_run_model

REPO = Path(__file__).resolve().parents[1]
PARAM_SETS = sorted(p.stem for p in (REPO / "params").glob("*.yaml"))


def _write(tmp_path: Path, data: dict, name: str = "set.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", list_model_configs())
def test_packaged_model_configs_hold_architecture_only(name):
    cfg = load_model_config(name)        # loading refuses training choices: this is the check
    assert "loss" not in cfg and "name" not in cfg.get("aggregator", {}) and "mode" not in cfg.get("scale", {})


def test_a_model_json_with_training_choices_is_refused_naming_the_parameters(tmp_path):
    cfg = json.loads((CONFIG_DIR / "tiny.json").read_text())
    cfg["loss"] = "siglip"
    cfg["aggregator"]["name"] = "transformer"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"sets training choice\(s\) loss, aggregator.name.*architecture only"):
        load_model_config(str(path))
    assert set(TRAINING_CHOICES) >= {"loss", "lock_image", "lock_text", "scale.mode", "scale.encoding",
                                     "scale.enabled", "aggregator.name"}


@pytest.mark.parametrize("name", PARAM_SETS)
def test_every_committed_parameter_set_validates(name):
    P = load_params(name)
    assert isinstance(P.train, TrainConfig) and isinstance(P.evaluation, EvaluationConfig)
    assert P.name == name


def test_the_run_choices_reach_the_model():
    cfg = load_config("ci", {"scale_mode": "mlp", "aggregator": "transformer", "loss": "siglip", "lock_text": False,
                             "scale_embed": False, "scale_encoding": "fourier"})
    model = build_run_model(cfg)
    assert model.scale.mode == "mlp" and not model.scale.aware and model.logit_bias is not None
    assert type(model.aggregator).__name__ == "TransformerPool" and model.lock_image
    assert model.config["scale"]["encoding"] == "fourier" and not model.config["lock_text"]


def test_head_sizes_are_set_from_params_and_left_alone_otherwise():
    json_cfg = load_model_config("tiny")
    plain = build_run_model(load_config("ci", {"scale_mode": "mlp"}))
    hidden = plain.scale.layers["mlp"][1].out_features
    assert hidden == json_cfg["scale"]["mlp"]["hidden_dim"]          # None keeps the JSON's value
    sized = build_run_model(load_config("ci", {"scale_mode": "mlp", "scale_hidden_dim": 24, "scale_dim": 6,
                                               "attention_hidden_dim": 5, "scale_range_nm": [1, 400]}))
    assert sized.scale.layers["mlp"][1].out_features == 24
    assert sized.config["scale"]["sincos"]["dim"] == 6 and sized.config["scale"]["range_nm"] == [1, 400]
    assert sized.config["aggregator"]["gated_attention"]["hidden_dim"] == 5
    n_plain = sum(p.numel() for p in plain.aggregator.parameters())
    n_sized = sum(p.numel() for p in sized.aggregator.parameters())
    assert n_sized < n_plain                                          # hidden 5 instead of the JSON's 16
    t = build_run_model(load_config("ci", {"aggregator": "transformer", "transformer_layers": 2,
                                           "transformer_heads": 1}))
    assert t.config["aggregator"]["transformer"] == {**json_cfg["aggregator"]["transformer"], "layers": 2, "heads": 1}


def test_every_training_key_is_settable_as_key_value_with_papermill_strings():
    cfg = load_config("ci", ["scale_hidden_dim=12", "attention_dropout=0.1", "scale_range_nm=[2, 50]"])
    assert cfg.scale_hidden_dim == 12 and cfg.attention_dropout == 0.1 and cfg.scale_range_nm == [2, 50]
    strings = TrainConfig(scale_hidden_dim="12", transformer_mlp_ratio="1.5", scale_range_nm="[2, 50]")
    assert strings.scale_hidden_dim == 12 and strings.transformer_mlp_ratio == 1.5 and strings.scale_range_nm == [2, 50]
    # a notebook's `overrides` parameter reaches any key its parameters cell does not name
    cfg = train_config("ci", overrides="scale_hidden_dim=7 weight_decay=0.2", epochs=3)
    assert (cfg.scale_hidden_dim, cfg.weight_decay, cfg.epochs) == (7, 0.2, 3)
    assert train_config("ci", overrides={"lr": 0.5}).lr == 0.5


@pytest.mark.parametrize("override, message", [
    ({"scale_dim": 0}, "scale_dim must be >= 1"),
    ({"transformer_dropout": 1.5}, r"transformer_dropout must be in \[0, 1\)"),
    ({"scale_range_nm": [50, 2]}, "scale_range_nm must be"),
    ({"scale_hidden_dim": "wide"}, "scale_hidden_dim='wide' is not a valid"),
    ({"aggregator": "max"}, "aggregator='max' is not one of mean, gated_attention, transformer"),
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("ci", override)


def test_unknown_keys_are_refused_with_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown training parameter\(s\): scale_hiden_dim; known: .*scale_hidden_dim"):
        load_config("ci", {"scale_hiden_dim": 3})
    base = yaml.safe_load((REPO / "params" / "ci.yaml").read_text())
    cases = [({**base, "data": {"dir": "x"}}, r"unknown section\(s\) data; known: .*the data: section is gone"),
             ({**base, "evaluation": {"top_k": 3}}, r"evaluation: unknown key\(s\) top_k; known: split, bootstrap, top_j"),
             ({**base, "ablations": {"seed": [0]}}, r"ablations: unknown key\(s\) seed; known: scale_mode"),
             ({**base, "study": {"threads": 2}}, r"study: unknown key\(s\) threads; known: workers"),
             ({**base, "hp_search": {"lr": [0.1, -1]}}, "lr must be > 0"),
             ({**base, "evaluation": {"bootstrap": 0}}, "bootstrap must be an integer >= 1")]
    for i, (data, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            load_params(str(_write(tmp_path, data, f"s{i}.yaml")))


def test_each_default_lives_in_one_place():
    assert TrainConfig().generate_patients == DEMO_PATIENTS
    assert "generate_patients" not in yaml.safe_load((REPO / "params" / "demo.yaml").read_text())["train"]
    makefile = (REPO / "Makefile").read_text()
    assert not re.search(rf"\b{DEMO_PATIENTS}\b", makefile), "the Makefile repeats the demo cohort size"
    import inspect
    from emclip.evaluation.report import evaluate
    signature = inspect.signature(evaluate).parameters
    assert signature["topj"].default == DEFAULT_EVALUATION.topj == (1, 3)
    assert signature["n_boot"].default == DEFAULT_EVALUATION.bootstrap
    # the choice tuples are the model's own, not copies
    from emclip.model import aggregators, scale
    from emclip.train import config
    assert config.AGGREGATORS is aggregators.AGGREGATORS and config.SCALE_MODES is scale.SCALE_MODES
    assert TrainConfig().scale_mode == scale.DEFAULT_SCALE_MODE and TrainConfig().aggregator == aggregators.DEFAULT_AGGREGATOR
    assert set(SECTIONS) == {"name", "train", "evaluation", "ablations", "hp_search", "study", "inference"}


def test_a_model_built_alone_takes_the_same_defaults_as_a_run():
    alone = build_model("tiny")
    run = build_run_model(TrainConfig(model="tiny"))
    assert alone.scale.mode == run.scale.mode and type(alone.aggregator) is type(run.aggregator)
    assert alone.config["scale"].get("encoding", TrainConfig().scale_encoding) == run.config["scale"]["encoding"]


def test_params_files_carry_only_schema_keys():
    names = {f.name for f in fields(TrainConfig)}
    for name in PARAM_SETS:
        raw = yaml.safe_load((REPO / "params" / f"{name}.yaml").read_text())
        assert set(raw) <= set(SECTIONS), name
        assert set(raw.get("train", {})) <= names, name


@pytest.mark.parametrize("notebook", ["02_features", "03_train", "04_ablations"])
def test_notebooks_that_configure_a_run_take_any_training_key_through_overrides(notebook):
    from emclip.notebook_params import declared_parameters
    assert "overrides" in declared_parameters(notebook)
