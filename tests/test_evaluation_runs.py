"""evaluation.runs: a trained run's checkpoint, model, embeddings, prompts and supervised bound."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from emclip.evaluation.runs import embed_run, load_run_model, prompt_classes, run_checkpoint, supervised_bound
from emclip.train.config import TrainConfig


def _cohort(*diagnoses):
    return SimpleNamespace(reports=pd.DataFrame({"diagnosis": list(diagnoses)}))


def test_prompt_classes_bundled_partly_or_from_the_cohort():
    renal = prompt_classes(_cohort("normal", "amyloidosis", None))
    assert "normal" in renal.classes and len(renal.classes) > 2           # the whole bundled renal set
    with pytest.warns(UserWarning, match="'glioma'"):
        mixed = prompt_classes(_cohort("normal", "glioma"))
    assert sorted(mixed.classes) == ["glioma", "normal"] and mixed.synonyms["normal"] == renal.synonyms["normal"]
    assert prompt_classes(_cohort("cat", "dog")) is None                  # nothing shared: the cohort's own classes


def test_the_supervised_bound_needs_cached_features():
    assert supervised_bound(None, TrainConfig(mode="e2e"), None, None, []) == {
        "skipped": "end-to-end run: no cached trunk features"}


@pytest.fixture(scope="module")
def trained_run(tiny_cohort, tmp_path_factory) -> Path:
    from emclip.train import load_config, train
    root = tmp_path_factory.mktemp("runs_module")
    run = root / "run-with-dashes"
    train(load_config("ci", dict(data_dir=str(tiny_cohort), run_dir=str(run), cache_dir=str(root / "cache"),
                                 epochs=1, batch_size=4, max_instances=3)), log=lambda *_: None)
    return run


@pytest.mark.slow
def test_a_run_loads_embeds_and_bounds_from_its_own_folder(trained_run, capsys):
    run = trained_run
    best = run_checkpoint(run)
    assert best == run / "checkpoints" / "best"
    model, cfg = load_run_model(run, device="cpu")
    recorded = TrainConfig(**json.loads((run / "config.json").read_text()))
    assert not model.training and cfg.to_dict() == recorded.to_dict()
    reloaded, _ = load_run_model(str(run), best, device="cpu")            # a folder the caller resolved
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)

    emb = embed_run(run, model=model, cfg=cfg)
    reports = pd.read_csv(Path(cfg.data_dir) / "reports.csv")
    assert sorted(emb.patient_ids.tolist()) == sorted(reports.patient_id.astype(str))
    assert emb.meta["run_dir"] == str(run) and set(emb.split.tolist()) <= {"train", "val", "test"}

    from emclip.train.runinfo import load_run_cohort
    cohort = load_run_cohort(cfg)
    classes = sorted({d for d in emb.diagnosis if d})
    first = supervised_bound(model, cfg, cohort, emb, classes)
    stored = list((cfg.cache_path / "bounds").glob("supervised_mil-*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text()) == first
    assert supervised_bound(model, cfg, cohort, emb, classes) == first   # kept, not retrained


@pytest.mark.slow
def test_a_damaged_best_checkpoint_is_replaced_by_a_named_substitute(trained_run, tmp_path, capsys):
    run = Path(shutil.copytree(trained_run, tmp_path / "copy"))
    weights = run / "checkpoints" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")
    used = run_checkpoint(run)
    assert used.parent == run / "checkpoints" and used.name.startswith("step_")
    said = capsys.readouterr().out
    assert "best is damaged" in said and str(used) in said
