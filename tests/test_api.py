"""emclip.api: a trained model applied to new patients through one code path with the evaluation."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import emclip
from emclip.api import ScaleRangeWarning, TrainedModel
from emclip.data import CohortError


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _images_only(source: Path, dest: Path, scale: float = 1.0) -> Path:
    """A cohort of the same images with only images.csv (absolute paths), nm/px optionally multiplied."""
    dest.mkdir()
    table = pd.read_csv(source / "images.csv")
    table["path"] = [str((source / p).resolve()) for p in table.path]
    table["nm_per_pixel"] = table.nm_per_pixel * scale
    table.to_csv(dest / "images.csv", index=False)
    return dest


@pytest.fixture(scope="module")
def trained(trained_run) -> TrainedModel:
    return emclip.load(trained_run, device="cpu")


def _probs(table: pd.DataFrame, prefix: str = "patient_p[") -> tuple[list[str], np.ndarray]:
    cols = [c for c in table.columns if c.startswith(prefix)]
    return cols, table[cols].to_numpy(np.float64)


def test_the_api_is_exported_from_the_package():
    for name in ("create_model_and_transforms", "get_tokenizer", "load", "TrainedModel"):
        assert callable(getattr(emclip, name))
    with pytest.raises(AttributeError):
        emclip.no_such_function   # noqa: B018


def test_create_model_and_transforms_gives_model_transform_and_tokenizer():
    model, transform, tokenizer = emclip.create_model_and_transforms("tiny")
    assert transform.image_size == model.preprocess["image_size"] == 32
    tokens = tokenizer(["thin glomerular basement membranes"])
    assert torch.equal(tokens, emclip.get_tokenizer("tiny")(["thin glomerular basement membranes"]))
    assert model.encode_text(["a report"]).shape == (1, model.embed_dim)


def test_a_run_loads_with_its_prompts_scale_range_and_weights(trained_run, trained):
    assert trained.kind == "run" and trained.source == trained_run
    assert "normal" in trained.prompts.classes
    lo, hi = trained.scale_range_nm
    assert 0 < lo < hi
    model, transform, tokenizer = emclip.create_model_and_transforms(trained_run)
    for a, b in zip(model.state_dict().values(), trained.model.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    assert emclip.get_tokenizer(trained_run)(["x"]).shape == tokenizer(["x"]).shape
    with pytest.raises(ValueError, match="loaded as it was trained"):
        emclip.create_model_and_transforms(trained_run, embed_dim=8)


def test_predict_gives_the_evaluations_own_probabilities(trained_run, trained, tiny_cohort):
    """One code path: the test patients' zero-shot probabilities of `predict` are those of the evaluation."""
    evaluation = pd.read_csv(trained_run / "eval" / "predictions.csv")
    table = trained.predict(tiny_cohort, progress=False)
    assert len(table) == len(pd.read_csv(tiny_cohort / "reports.csv"))
    merged = evaluation.merge(table, on="patient_id", suffixes=("_eval", "_predict"))
    assert len(merged) == len(evaluation) > 0
    cols, _ = _probs(evaluation)
    a = merged[[c + "_eval" for c in cols]].to_numpy(np.float64)
    b = merged[[c + "_predict" for c in cols]].to_numpy(np.float64)
    assert np.abs(a - b).max() < 1e-5
    assert (merged.patient_pred_eval == merged.patient_pred_predict).all()
    _, corrected = _probs(table, "prior_corrected_p[")
    assert np.allclose(corrected.sum(1), 1) and not np.allclose(corrected, _probs(table)[1])
    assert set(table.columns) >= {"patient_id", "diagnosis", "patient_pred", "prior_corrected_pred", "n_images",
                                  "nm_per_pixel_min", "nm_per_pixel_max", "most_attended_image", "attention"}


def test_predict_on_an_images_only_cohort_writes_nothing_into_it(trained, tiny_cohort, tmp_path):
    cohort = _images_only(tiny_cohort, tmp_path / "new")
    before = _snapshot(cohort)
    table = trained.predict(cohort, progress=False)
    assert _snapshot(cohort) == before
    images = pd.read_csv(cohort / "images.csv")
    assert len(table) == images.patient_id.nunique() and "diagnosis" not in table.columns
    sizes = images.groupby("patient_id").size()
    assert (table.set_index("patient_id").n_images == sizes.reindex(table.patient_id).to_numpy()).all()
    mins = images.groupby("patient_id").nm_per_pixel.min()
    assert np.allclose(table.set_index("patient_id").nm_per_pixel_min, mins.reindex(table.patient_id))
    # the most attended image is one of the patient's own, with the highest weight of its bag
    emb = trained.embed(cohort, progress=False)
    for row in table.itertuples():
        own = emb.image_paths[emb.image_patient == list(emb.patient_ids).index(row.patient_id)]
        assert row.most_attended_image in own


def test_images_streamed_through_the_trunk_equal_the_feature_cache(trained, tiny_cohort, monkeypatch):
    cached = trained.embed(tiny_cohort, progress=False)
    monkeypatch.setattr(trained, "_cached_features", lambda cohort: None)
    streamed = emclip.api.Embeddings.concat(list(trained.iter_embeddings(tiny_cohort, batch_size=3,
                                                                         chunk_images=7, progress=False)))
    assert streamed.patient_ids.tolist() == cached.patient_ids.tolist()
    assert np.abs(streamed.patient - cached.patient).max() < 1e-5
    assert np.abs(streamed.image - cached.image).max() < 1e-5
    assert np.allclose(streamed.image_scales, cached.image_scales)    # the zoom reaches the scale
    assert not np.allclose(streamed.image_scales, pd.read_csv(tiny_cohort / "images.csv").nm_per_pixel)


def test_an_image_embeds_alone_as_it_does_in_its_bag(trained, tiny_cohort):
    emb = trained.embed(tiny_cohort, progress=False)
    images = pd.read_csv(tiny_cohort / "images.csv")
    row = images.iloc[5]
    alone = trained.embed_images([tiny_cohort / row.path], [row.nm_per_pixel])
    where = list(emb.image_paths).index(str((tiny_cohort / row.path).resolve()))
    assert np.abs(alone[0] - emb.image[where]).max() < 1e-5
    with pytest.raises(ValueError, match="one finite nm_per_pixel"):
        trained.embed_images([tiny_cohort / row.path], [0.0])


def test_scales_outside_the_training_range_are_named(trained, tiny_cohort, tmp_path):
    cohort = _images_only(tiny_cohort, tmp_path / "zoomed", scale=40.0)
    with pytest.warns(ScaleRangeWarning, match=r"images .* outside the .* nm/px its training images covered"):
        trained.predict(cohort, progress=False)


def test_bad_cohorts_are_refused_naming_file_and_row(trained, tiny_cohort, tmp_path):
    cohort = _images_only(tiny_cohort, tmp_path / "bad")
    table = pd.read_csv(cohort / "images.csv", dtype=str, keep_default_na=False)
    table.loc[3, "nm_per_pixel"] = ""
    table.to_csv(cohort / "images.csv", index=False)
    with pytest.raises(CohortError, match=r"images.csv, row 4 .*nm_per_pixel is missing"):
        trained.predict(cohort, progress=False)
    (tmp_path / "broken").mkdir()
    table = pd.read_csv(tiny_cohort / "images.csv").head(3)
    victim = tmp_path / "broken" / "cut.tif"
    victim.write_bytes((tiny_cohort / table.path[0]).read_bytes()[:200])
    table["path"] = [str(victim)] + [str((tiny_cohort / p).resolve()) for p in table.path[1:]]
    table.to_csv(tmp_path / "broken" / "images.csv", index=False)
    with pytest.raises(Exception, match="cut.tif"):
        trained.predict(tmp_path / "broken", progress=False)


def test_a_missing_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        emclip.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither an exported model folder"):
        emclip.load(tmp_path / "empty")
