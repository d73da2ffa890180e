"""06_inference's package side: the parameter set's inference: section, the cohort of new patients (generated only
when it is the set's own), the tables a reader sees, and the figures (most attended images, search hits, the new
patients on the training map). The notebook itself runs in tests/test_notebook_outputs.py."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from matplotlib.colors import to_rgba

from emclip.paramsets import load_params
from emclip.serving import figures, inference
from emclip.serving.inference import InferenceConfig, inference_cohort

REPO = Path(__file__).resolve().parents[1]


def _write_set(tmp_path: Path, **inference_section) -> str:
    raw = yaml.safe_load((REPO / "params" / "ci.yaml").read_text())
    raw["inference"] = {**raw["inference"], **inference_section}
    path = tmp_path / "set.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


# ------------------------------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("name", ["demo", "ci", "demo_unlabelled", "study"])
def test_every_committed_set_names_a_cohort_of_new_patients_of_another_seed(name):
    P = load_params(name)
    assert P.inference.data_dir and P.inference.data_path != P.train.data_path
    assert P.inference.data_seed != P.train.data_seed and P.inference.query.strip() and P.inference.k >= 1


@pytest.mark.parametrize("section, message", [
    ({"data_seeds": 3}, r"inference: unknown key\(s\) data_seeds; known: data_dir, generate_cohort"),
    ({"k": 0}, "k must be an integer >= 1, got 0"),
    ({"query": "  "}, "query must be a non-empty text"),
    ({"generate_image_size": 16}, "generate_image_size must be an integer >= 32"),
    ({"generate_patients": "many"}, "generate_patients must be an integer >= 1, got 'many'"),
    ({"data_seed": 1}, "inference.data_seed 1 is the training cohort's seed"),   # ci trains on seed 1
])
def test_bad_inference_settings_are_refused_naming_the_key(tmp_path, section, message):
    with pytest.raises(ValueError, match=message):
        load_params(_write_set(tmp_path, **section))


def test_a_set_without_the_section_names_no_cohort_and_says_so():
    settings = InferenceConfig()
    assert settings.data_dir is None and settings.query and settings.k == 5
    with pytest.raises(ValueError, match="names no cohort of new patients .*give the notebook a data_dir"):
        inference_cohort(settings)


# ------------------------------------------------------------------------------------------ the new cohort

def test_the_sets_own_cohort_is_generated_whole_without_its_diagnosis_column(tmp_path):
    settings = InferenceConfig(data_dir=str(tmp_path / "new"), generate_patients=3, generate_image_size=32,
                               data_seed=4)
    lines = []
    path = inference_cohort(settings, log=lines.append)
    assert path == tmp_path / "new" and "generating a cohort of new patients" in lines[0]
    images, reports = pd.read_csv(path / "images.csv"), pd.read_csv(path / "reports.csv")
    assert reports.patient_id.nunique() == 3 == images.patient_id.nunique()
    assert "diagnosis" not in reports.columns                      # as a new archive would come
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]   # written beside, renamed into place
    stamp = (path / "images.csv").stat().st_mtime_ns
    assert inference_cohort(settings, log=lines.append) == path and len(lines) == 1   # there: read, not redone
    assert (path / "images.csv").stat().st_mtime_ns == stamp


def test_a_folder_the_user_names_is_never_generated_into(tmp_path):
    settings = InferenceConfig(data_dir=str(tmp_path / "set_own"), generate_patients=2, generate_image_size=32)
    with pytest.raises(FileNotFoundError, match=r"data_dir .*mine has no images.csv"):
        inference_cohort(settings, data_dir=tmp_path / "mine")
    assert not (tmp_path / "mine").exists() and not (tmp_path / "set_own").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError, match="it is not empty, so nothing is generated into it"):
        inference_cohort(InferenceConfig(data_dir=str(busy)))
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    with pytest.raises(FileNotFoundError, match="inference.generate_cohort is off"):
        inference_cohort(InferenceConfig(data_dir=str(tmp_path / "off"), generate_cohort=False))
    assert not (tmp_path / "off").exists()


# -------------------------------------------------------------------------------------------------- tables

def _predictions() -> pd.DataFrame:
    classes = ["normal", "amyloidosis", "IgA nephropathy"]
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.1, 0.85, 0.05]])
    table = pd.DataFrame({"patient_id": ["A", "B", "C", "D", "E"]})
    for key, p in (("patient", probs), ("prior_corrected", probs[:, ::-1])):
        table[f"{key}_pred"] = [classes[i] for i in p.argmax(1)]
        for c, name in enumerate(classes):
            table[f"{key}_p[{name}]"] = p[:, c]
    table["n_images"] = [3, 4, 1, 2, 1]
    table["nm_per_pixel_min"], table["nm_per_pixel_max"] = [2.0, 3.0, 5.0, 4.0, 6.0], [50.0, 9.0, 5.0, 8.0, 6.0]
    table["most_attended_image"] = [f"/data/new/images/{p}/1.tif" for p in table.patient_id]
    table["attention"] = 0.5
    return table, classes


def test_the_prediction_view_shows_each_patients_predicted_class_with_its_probability():
    table, classes = _predictions()
    view = inference.prediction_view(table, "/data/new")
    assert list(view.index) == list(table.patient_id)
    assert list(view["predicted"]) == ["normal", "amyloidosis", "normal", "IgA nephropathy", "amyloidosis"]
    assert list(view["p(predicted)"]) == [0.7, 0.6, 0.8, 0.5, 0.85]
    assert list(view["prior-corrected"]) == list(table.prior_corrected_pred)
    assert view["most attended image"].iloc[0] == "images/A/1.tif"          # relative to the cohort
    assert list(view["min nm/px"]) == ["2", "3", "5", "4", "6"]
    counts = inference.class_counts(table, classes)
    assert list(counts.index) == classes and counts.sum().tolist() == [5, 5]
    assert counts.loc["amyloidosis", "predicted"] == 2


def test_example_patients_differ_in_predicted_class_and_prefer_bags_of_several_images():
    table, _ = _predictions()
    # the most confident of each class, multi-image bags first: C and E (one image each) come after A, B and D
    assert inference.example_patients(table, 3) == ["A", "B", "D"]
    assert inference.example_patients(table, 5) == ["A", "B", "D", "E", "C"]
    assert inference.example_patients(table, 3, min_images=1) == ["E", "C", "D"]


def test_the_commands_name_this_run_relative_to_the_project_and_quote_the_query():
    from emclip.paths import project_root
    text = inference.command_lines(project_root() / "runs" / "x", "/elsewhere/cohort", "fibrils 'of' 8 nm", "P7", 4)
    assert "python -m emclip.predict runs/x /elsewhere/cohort --out my_predictions.csv" in text
    assert "python -m emclip.search my_index 'fibrils '\"'\"'of'\"'\"' 8 nm' -k 4 --level image" in text
    assert "--patient P7 -k 4" in text and "python -m emclip.export runs/x --out my_model" in text


def test_scale_warnings_become_text_once_each_and_other_warnings_pass():
    from emclip.api import ScaleRangeWarning
    with pytest.warns(UserWarning, match="something else"):
        with inference.scale_warnings() as notes:
            warnings.warn("3 of 9 images outside", ScaleRangeWarning)
            warnings.warn("3 of 9 images outside", ScaleRangeWarning)      # predict, then the index: once
            warnings.warn("2 of 5 images outside", ScaleRangeWarning)
            warnings.warn("something else", UserWarning)
    assert notes == ["3 of 9 images outside", "2 of 5 images outside"]


# ------------------------------------------------------------------------------------------------- figures

@pytest.fixture(scope="module")
def bag_images(tmp_path_factory) -> pd.DataFrame:
    """Two patients' images on disk (each a flat grey of its own level), with nm/px and attention weights."""
    root = tmp_path_factory.mktemp("bags")
    rows = []
    for pid, weights in (("P1", [0.1, 0.4, 0.2, 0.05, 0.25]), ("P2", [0.5, 0.5])):
        for i, w in enumerate(weights):
            path = root / f"{pid}_{i}.tif"
            tifffile.imwrite(path, np.full((40, 40), 20 * i + 10, np.uint8))
            rows.append({"patient_id": pid, "path": str(path), "nm_per_pixel": 2.0 + i * 10, "attention": w})
    return pd.DataFrame(rows)


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_most_attended_images_are_each_patients_highest_weights_with_their_nm_per_pixel(bag_images):
    fig = figures.plot_most_attended(bag_images, ["P1", "P2"], n_images=3, labels={"P1": "predicted: normal"})
    assert _titles(fig) == ["weight 0.40 · 12 nm/px", "weight 0.25 · 42 nm/px", "weight 0.20 · 22 nm/px",
                            "weight 0.50 · 2 nm/px", "weight 0.50 · 12 nm/px"]
    assert "P1 (5 images)\npredicted: normal" in [ax.get_ylabel() for ax in fig.axes]
    assert "most attended" in fig._suptitle.get_text().replace("\n", " ")
    with pytest.raises(KeyError, match="no image of patient"):
        figures.plot_most_attended(bag_images, ["P9"])


def test_under_mean_pooling_the_figure_says_every_image_weighs_the_same(bag_images):
    uniform = bag_images.assign(attention=1 / bag_images.groupby("patient_id").path.transform("size"))
    assert figures.uniform_weights(uniform) and not figures.uniform_weights(bag_images)
    fig = figures.plot_most_attended(uniform, ["P1"], n_images=2)
    assert "every image of a patient weighs the same" in fig._suptitle.get_text().replace("\n", " ")
    assert _titles(fig) == ["2 nm/px", "12 nm/px"]                 # bag order; no weight to show


def test_patient_hits_show_each_patients_most_attended_image(bag_images):
    hits = pd.DataFrame({"rank": [1, 2], "score": [0.9, 0.8], "patient_id": ["P2", "P1"]})
    fig = figures.plot_search_hits(hits, "patients", images=bag_images)
    assert _titles(fig) == ["#1 P2 · 2 nm/px\nscore 0.900\n(its most attended image)",
                            "#2 P1 · 12 nm/px\nscore 0.800\n(its most attended image)"]
    shown = fig.axes[1].get_images()[0].get_array()
    assert np.allclose(shown, 0)                                    # P1_1.tif: flat, shown min-max scaled
    image_hits = bag_images.iloc[[3]].assign(rank=1, score=0.5)
    assert _titles(figures.plot_search_hits(image_hits, "images")) == ["#1 P1 · 32 nm/px\nscore 0.500"]
    with pytest.raises(ValueError, match="patient hits need the images table"):
        figures.plot_search_hits(hits, "patients")


def test_the_map_is_fitted_on_the_training_patients_alone():
    from sklearn.decomposition import PCA
    rng = np.random.default_rng(0)
    reference, new = rng.normal(size=(30, 8)), rng.normal(size=(5, 8)) + 3
    ref_xy, new_xy, explained = figures.map_coordinates(reference, new)
    pca = PCA(n_components=2, svd_solver="full").fit(reference)
    assert np.allclose(new_xy, pca.transform(new)) and np.allclose(ref_xy, pca.transform(reference))
    ref_again, _, _ = figures.map_coordinates(reference, new[:2] * 10)
    assert np.allclose(ref_again, ref_xy)                           # new patients never move the map
    assert 0 < explained[1] <= explained[0] < 1
    with pytest.raises(ValueError, match="same width"):
        figures.map_coordinates(reference, new[:, :4])


def test_new_patients_are_overlaid_as_stars_in_their_predicted_class_colour():
    rng = np.random.default_rng(1)
    reference, new = rng.normal(size=(12, 6)), rng.normal(size=(4, 6))
    ref_labels = ["normal"] * 6 + ["amyloidosis"] * 5 + [""]
    new_labels = ["amyloidosis", "normal", "amyloidosis", "IgA nephropathy"]
    fig = figures.plot_new_patients_map(reference, ref_labels, new, new_labels,
                                        classes=["normal", "amyloidosis", "IgA nephropathy", "lupus nephritis"])
    ax = fig.axes[0]
    stars = [c for c in ax.collections if c.get_label() == "new patients"]
    assert len(stars) == 1 and len(stars[0].get_offsets()) == 4
    _, new_xy, _ = figures.map_coordinates(reference, new)
    assert np.allclose(stars[0].get_offsets(), new_xy)
    dots = {tuple(c.get_facecolor()[0][:3]): len(c.get_offsets()) for c in ax.collections if c not in stars}
    star_colours = [tuple(c[:3]) for c in stars[0].get_facecolor()]
    assert star_colours[0] == star_colours[2] != star_colours[1]             # one colour per class
    assert dots[star_colours[1]] == 6 and dots[star_colours[0]] == 5          # the training dots of that class
    assert dots[to_rgba("#c8c8c8")[:3]] == 1                                  # no diagnosis: grey
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "lupus nephritis" not in legend and "new patients (4), by predicted class" in legend
    with pytest.raises(ValueError, match="one label per patient"):
        figures.plot_new_patients_map(reference, ref_labels[:-1], new, new_labels)


# --------------------------------------------------------------------------- the index 06 writes, end to end

@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A tiny random model as a TrainedModel (as an exported folder would load): no run, no training cohort."""
    from emclip.api import TrainedModel
    from emclip.evaluation.zeroshot import load_prompts
    from emclip.model import build_model
    return TrainedModel(build_model("tiny"), load_prompts("renal_em"), (5.0, 60.0),
                        tmp_path_factory.mktemp("model"), "folder")


def test_the_index_keeps_each_images_nm_per_pixel_as_the_cohort_gives_it(tmp_path, tiny_cohort, random_model):
    from emclip.embed import write_index
    from emclip.serving.index import EmbeddingIndex
    before = sorted(p.relative_to(tiny_cohort) for p in tiny_cohort.rglob("*"))
    with inference.scale_warnings() as notes:
        out = write_index(random_model, tiny_cohort, tmp_path / "index", progress=False)
    index = EmbeddingIndex.load(out)
    given = pd.read_csv(tiny_cohort / "images.csv")
    by_path = dict(zip([str((tiny_cohort / p).resolve()) for p in given.path], given.nm_per_pixel))
    assert index.n_patients == given.patient_id.nunique() and index.n_images == len(given)
    assert np.allclose(index.images.nm_per_pixel, [by_path[str(Path(p).resolve())] for p in index.images.path])
    assert not np.allclose(index.images.nm_per_pixel, index.images.effective_nm_per_pixel)   # 48 px seen at 32
    assert len(notes) == 1 and "outside the 5-60 nm/px" in notes[0]
    assert sorted(p.relative_to(tiny_cohort) for p in tiny_cohort.rglob("*")) == before     # nothing written there
    assert inference.training_embeddings(random_model) is None     # an exported folder carries no cohort
    assert figures.uniform_weights(index.images)                    # the tiny model pools by mean: 1/n each
    assert "pools by **mean**: every image of a patient weighs the same" in \
        inference.pooling_sentence(random_model.model)
    from emclip.model import build_model
    assert "pools by **gated attention**" in inference.pooling_sentence(build_model("tiny",
                                                                                    aggregator="gated_attention"))
