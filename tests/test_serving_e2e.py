"""A trained run served end to end: exported and moved, embedded into an index, searched, each checked against the
evaluation's own numbers; and what each command says about a damaged model or index."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import emclip
from emclip import embed, export, predict, search
from emclip.serving.cli import run
from emclip.serving.index import EmbeddingIndex


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "model"
    assert run(export.main, [str(trained_run), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def index(trained_run, tiny_cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "index"
    assert run(embed.main, [str(trained_run), str(tiny_cohort), "--out", str(out), "--device", "cpu"]) == 0
    return out


def _probs(table: pd.DataFrame) -> np.ndarray:
    return table[[c for c in table.columns if "_p[" in c]].to_numpy(np.float64)


def test_an_exported_model_predicts_identically_without_its_run(trained_run, exported, tiny_cohort, tmp_path):
    before = emclip.load(trained_run, device="cpu").predict(tiny_cohort, progress=False)
    moved = Path(shutil.move(str(trained_run), str(tmp_path / "moved_run")))
    try:
        trained = emclip.load(exported, device="cpu")
        assert trained.kind == "folder" and trained.prompts.classes == emclip.load(moved).prompts.classes
        after = trained.predict(tiny_cohort, progress=False)
    finally:
        shutil.move(str(moved), str(trained_run))
    assert after.patient_id.tolist() == before.patient_id.tolist()
    assert np.abs(_probs(after) - _probs(before)).max() < 1e-6
    assert (after.patient_pred == before.patient_pred).all()
    config = json.loads((exported / "config.json").read_text())
    assert config["scale_range_nm"] == pytest.approx(list(emclip.load(trained_run).scale_range_nm))
    assert str(tiny_cohort) not in (exported / "config.json").read_text()     # no local path travels with it
    card = (exported / "README.md").read_text()
    assert "synthetic" in card.lower() and "emclip.load" in card


def test_a_damaged_model_folder_is_named(exported, tiny_cohort, tmp_path, capsys):
    copy = Path(shutil.copytree(exported, tmp_path / "copy"))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert run(predict.main, [str(copy), str(tiny_cohort), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors" in err and "Traceback" not in err
    shutil.copy2(exported / "model.safetensors", weights)
    (copy / "prompts.yaml").unlink()
    assert run(predict.main, [str(copy), str(tiny_cohort), "--out", str(tmp_path / "p.csv")]) == 2
    assert "prompts.yaml" in capsys.readouterr().err


def test_embed_then_search_reproduces_the_evaluations_report_to_patient_recall(trained_run, index, tiny_cohort):
    metrics = json.loads((trained_run / "eval" / "metrics.json").read_text())
    expected = metrics["retrieval"]["report_to_patient"]["recall"]["1"]["value"]
    trained = emclip.load(trained_run, device="cpu")
    reports = pd.read_csv(tiny_cohort / "reports.csv")
    loaded = EmbeddingIndex.load(index)
    test_ids = loaded.patients.patient_id[loaded.patients.split == "test"].tolist()
    assert len(test_ids) == metrics["n_patients"]
    hits = [trained.search(loaded, text=reports.set_index("patient_id").report[pid], k=1, split="test")
            .patient_id.iloc[0] == pid for pid in test_ids]
    assert np.mean(hits) == pytest.approx(expected)


def test_the_index_holds_every_patient_and_image_with_given_and_effective_scales(index, tiny_cohort):
    loaded = EmbeddingIndex.load(index)
    images = pd.read_csv(tiny_cohort / "images.csv")
    assert loaded.n_patients == images.patient_id.nunique() and loaded.n_images == len(images)
    given = dict(zip([str((tiny_cohort / p).resolve()) for p in images.path], images.nm_per_pixel))
    assert np.allclose(loaded.images.nm_per_pixel, [given[p] for p in loaded.images.path])
    assert not np.allclose(loaded.images.nm_per_pixel, loaded.images.effective_nm_per_pixel)
    assert loaded.meta["model_identity"] == emclip.load(loaded.meta["model"]).identity


def test_search_commands_by_text_patient_and_image(index, tiny_cohort, capsys, tmp_path):
    assert run(search.main, [str(index), "amyloid fibrils, randomly arranged", "-k", "3", "--device", "cpu"]) == 0
    assert "rank" in capsys.readouterr().out
    loaded = EmbeddingIndex.load(index)
    pid = loaded.patients.patient_id.iloc[0]
    out = tmp_path / "hits.csv"
    assert run(search.main, [str(index), "--patient", pid, "-k", "4", "--out", str(out)]) == 0
    hits = pd.read_csv(out)
    assert len(hits) == 4 and pid not in hits.patient_id.tolist() and hits.score.is_monotonic_decreasing
    path = loaded.images.path.iloc[0]
    assert run(search.main, [str(index), "--image", path, "-k", "5", "--out", str(out)]) == 0
    hits = pd.read_csv(out)
    assert "path" in hits.columns and loaded.images.patient_id.iloc[0] not in hits.patient_id.tolist()
    # a new image file with its nm/px is embedded by the model that wrote the index
    assert run(search.main, [str(index), "--image", path, "--nm-per-pixel",
                             str(loaded.images.nm_per_pixel.iloc[0]), "--level", "image", "-k", "1", "--out",
                             str(out), "--device", "cpu"]) == 0
    assert pd.read_csv(out).path.iloc[0] == path      # the same file at the same scale is its own nearest image


def test_search_names_what_is_wrong(index, tmp_path, capsys):
    assert run(search.main, [str(index), "--patient", "P99999"]) == 2
    assert "P99999" in capsys.readouterr().err
    assert run(search.main, [str(tmp_path / "no_index"), "x"]) == 2
    assert "error: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search.main([str(index)])                 # no query
    assert "exactly one query" in capsys.readouterr().err


def test_an_index_is_searched_only_with_the_model_that_wrote_it(index, tmp_path, trained_run):
    other = emclip.load(trained_run, device="cpu")
    with torch_no_grad():
        other.model.logit_scale.add_(0.5)          # other weights, another space
    other._identity = None
    with pytest.raises(ValueError, match="written by another model"):
        other.search(index, text="normal glomerulus")


def torch_no_grad():
    import torch
    return torch.no_grad()


@pytest.fixture(scope="module")
def second_cohort(tmp_path_factory) -> Path:
    from emclip.synthetic import generate_cohort
    return generate_cohort(tmp_path_factory.mktemp("hospital_b") / "cohort", n_patients=12, seed=11, image_size=48,
                           workers=1, progress=False)


@pytest.mark.slow
def test_the_api_evaluates_any_cohort_from_a_run_and_from_an_exported_folder(trained_run, exported, second_cohort,
                                                                              tmp_path):
    metrics = emclip.load(trained_run, device="cpu").evaluate(second_cohort, n_boot=20, figures=False,
                                                              log=lambda *_: None)
    assert metrics["external"]["n_patients"] == 12 and metrics["n_patients"] == 12
    assert "mean" in json.dumps(metrics["linear_probe"])            # fitted on the run's own train split
    folder = emclip.load(exported, device="cpu").evaluate(second_cohort, out=tmp_path / "eval", n_boot=20,
                                                          figures=False)
    assert folder["n_patients"] == 12 and "skipped" in folder["linear_probe"]
    assert folder["zero_shot"]["patient"]["n"] == metrics["zero_shot"]["patient"]["n"]
    raw = folder["zero_shot"]["patient"]["balanced_accuracy"]["value"]
    assert raw == pytest.approx(metrics["zero_shot"]["patient"]["balanced_accuracy"]["value"], abs=1e-9)
