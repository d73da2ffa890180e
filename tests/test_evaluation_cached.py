"""evaluation.cached: the evaluation key changes exactly when something the metrics depend on changes, and
key_changes says what (the end-to-end reuse of a real run is tests/test_cache_state.py)."""
import copy
import json
from types import SimpleNamespace

import pandas as pd
import pytest

from emclip.evaluation.cached import evaluation_key, key_changes
from emclip.train.config import TrainConfig

ARGS = dict(split="test", n_boot=100, topj=(1, 3), figures=True, feature_key="features-1")


@pytest.fixture
def setup(tmp_path):
    ckpt = tmp_path / "checkpoints" / "best"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 40, "frozen_digest": "f0",
                                                "checksums": {"model.safetensors": "aa" * 32}}))
    images = []
    for i in range(4):
        (tmp_path / f"img{i}.png").write_bytes(b"x" * (i + 1))
        images.append({"patient_id": f"P{i // 2}", "path": str(tmp_path / f"img{i}.png"), "nm_per_pixel": 2.0})
    cohort = SimpleNamespace(
        reports=pd.DataFrame({"patient_id": ["P0", "P1"], "split": ["test", "test"],
                              "diagnosis": ["normal", "amyloidosis"], "diagnosis_source": ["given", "given"],
                              "report": ["normal kidney", "amyloid deposits"]}),
        images=pd.DataFrame(images), labels={"uncertain": "exclude"})
    return ckpt, TrainConfig(), cohort


def _key(setup, **changed):
    ckpt, cfg, cohort = setup
    args = {**ARGS, **changed}
    return evaluation_key(ckpt, cfg, cohort, args["split"], args["n_boot"], args["topj"], args["figures"],
                          args["feature_key"])


def _changed_parts(a, b):
    return {k for k in b["parts"] if a["parts"].get(k) != b["parts"][k]}


def test_the_key_is_stable_for_the_same_inputs(setup):
    a, b = _key(setup), _key(setup)
    assert a == b and len(a["digest"]) == 16 and key_changes(a, b) == []
    assert a["parts"]["checkpoint"] == {"path": str(setup[0]), "step": 40, "frozen_digest": "f0", "sha256": "aa" * 32}


@pytest.mark.parametrize("argument, value, part", [
    ("split", "val", "split"), ("n_boot", 200, "n_boot"), ("topj", (1, 5), "topj"), ("figures", False, "figures"),
    ("feature_key", "features-2", "feature_cache")])
def test_each_argument_changes_its_part_alone(setup, argument, value, part):
    base, other = _key(setup), _key(setup, **{argument: value})
    assert other["digest"] != base["digest"] and _changed_parts(base, other) == {part}


def test_checkpoint_config_cohort_and_prompts_each_change_their_part_alone(setup):
    ckpt, cfg, cohort = setup
    base = _key(setup)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "checksums": {"model.safetensors": "bb" * 32}}))
    assert _changed_parts(base, _key(setup)) == {"checkpoint"}
    (ckpt / "meta.json").write_text(json.dumps(meta))

    assert _changed_parts(base, _key((ckpt, TrainConfig(lr=cfg.lr * 2), cohort))) == {"config"}

    edited = copy.deepcopy(cohort)
    edited.reports.loc[0, "report"] = "normal kidney, no deposits"
    assert _changed_parts(base, _key((ckpt, cfg, edited))) == {"cohort"}
    edited = copy.deepcopy(cohort)
    edited.images.loc[0, "nm_per_pixel"] = 4.0
    assert _changed_parts(base, _key((ckpt, cfg, edited))) == {"cohort"}
    edited = copy.deepcopy(cohort)
    edited.labels = {"uncertain": "positive"}
    assert _changed_parts(base, _key((ckpt, cfg, edited))) == {"cohort"}
    # another renal diagnosis: the reports table changes, the prompts (the bundled renal set) do not
    edited = copy.deepcopy(cohort)
    edited.reports.loc[1, "diagnosis"] = "membranous nephropathy"
    assert _changed_parts(base, _key((ckpt, cfg, edited))) == {"cohort"}
    # a diagnosis outside the renal classes is prompted by its name: the zero-shot classes change too
    edited.reports.loc[1, "diagnosis"] = "glioma"
    with pytest.warns(UserWarning, match="prompted by name only"):
        assert _changed_parts(base, _key((ckpt, cfg, edited))) == {"cohort", "prompts"}


def test_end_to_end_mode_keys_the_image_files_themselves(setup, tmp_path):
    ckpt, cfg, cohort = setup
    base = _key(setup, feature_key=None)
    assert "image_files" in base["parts"] and "feature_cache" not in base["parts"]
    (tmp_path / "img3.png").write_bytes(b"rewritten")
    assert _changed_parts(base, _key(setup, feature_key=None)) == {"image_files"}


def test_a_cohort_without_diagnoses_still_has_a_key(setup):
    ckpt, cfg, cohort = setup
    cohort.reports["diagnosis"] = [None, None]
    assert _key(setup)["parts"]["prompts"].startswith("none (")


def test_key_changes_says_what_changed():
    old = {"parts": {"topj": [1, 3], "n_boot": 10, "figures": True, "split": "test",
                     "checkpoint": {"step": 40, "sha256": "aa"}, "config": {"lr": 0.001}}}
    new = {"parts": {"topj": [1, 5], "n_boot": 10, "figures": False, "split": "val",
                     "checkpoint": {"step": 41, "sha256": "aa"}, "config": {"lr": 0.001, "seed": 1},
                     "prompts": "p1"}}
    assert key_changes(old, new) == [
        "topj changed (1, 3) -> (1, 5)",       # figures made but no longer asked for is not a change
        "split changed 'test' -> 'val'",
        "checkpoint.step changed 40 -> 41",
        "config.seed changed '<absent>' -> 1",
        "prompts changed '<not recorded>' -> 'p1'"]
    assert key_changes({**old, "parts": {**old["parts"], "figures": False}},
                       {"parts": {**old["parts"], "figures": True}}) == ["figures changed False -> True"]
    assert key_changes({}, {"parts": {"n_boot": 5}}) == ["n_boot changed '<not recorded>' -> 5"]


def test_the_frozen_digest_is_remembered_until_a_frozen_tensor_changes():
    """Checkpoints record a digest of the frozen towers; it is hashed once, and again only after a write to them."""
    import torch
    from emclip.model import build_model
    from emclip.train import checkpoint
    model = build_model("tiny", lock_image=True)
    calls = []
    real = checkpoint.tensors_digest
    checkpoint.tensors_digest = lambda items: calls.append(1) or real(items)
    try:
        first = checkpoint.frozen_digest(model)
        assert checkpoint.frozen_digest(model) == first and len(calls) == 1
        with torch.no_grad():
            next(model.trunk.parameters()).mul_(2.0)      # in place: same storage, new version
        assert checkpoint.frozen_digest(model) != first and len(calls) == 2
        model.trunk.load_state_dict({k: v.clone() for k, v in model.trunk.state_dict().items()})
        checkpoint.frozen_digest(model)
        assert len(calls) == 3                              # loaded weights are hashed again
    finally:
        checkpoint.tensors_digest = real
