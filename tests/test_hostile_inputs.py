"""Hostile inputs a new user produces: each is used correctly or refused with the file, row and problem, and nothing
the user owns is written (issue 13; the rest of that issue's catalogue is still open)."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from emclip.data import CohortError, load_cohort
from emclip.labels.__main__ import main as labels_main
from emclip.train.config import load_config
from emclip.train.runinfo import ensure_cohort


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_a_named_data_dir_is_never_generated_into(tmp_path):
    typo = tmp_path / "my_cohrot"
    with pytest.raises(FileNotFoundError, match="a data_dir you name is never generated into"):
        ensure_cohort(load_config("ci", {"data_dir": str(typo)}))
    assert not typo.exists()
    user = tmp_path / "archive"          # a folder with the user's images and a table emclip cannot read
    (user / "images").mkdir(parents=True)
    (user / "images" / "a.tif").write_bytes(b"II*\x00user data")
    (user / "reports.parquet").write_bytes(b"not parquet")
    before = _snapshot(user)
    with pytest.raises((FileNotFoundError, CohortError)):
        ensure_cohort(load_config("ci", {"data_dir": str(user), "generate_cohort": True}))
    assert _snapshot(user) == before     # nothing generated, overwritten or added


def test_training_on_a_user_cohort_writes_nothing_into_it(cohort_copy, tmp_path):
    from emclip.train import train
    before = _snapshot(cohort_copy)
    train(load_config("ci", dict(data_dir=str(cohort_copy), run_dir=str(tmp_path / "run"),
                                 cache_dir=str(tmp_path / "cache"), epochs=1, batch_size=4, max_instances=3)))
    assert _snapshot(cohort_copy) == before
    assert (tmp_path / "run" / "checkpoints").is_dir()


@pytest.mark.parametrize("value, message", [
    ("4_2", "is not a number"),
    ("0.004", r"is outside the plausible 0.1-50000 nm/px \(a value in µm"),      # µm instead of nm
    ("1e-50", "is outside the plausible"),
    ("1e39", "is outside the plausible 0.1-50000 nm/px$"),
])
def test_implausible_or_sloppy_scales_are_refused(cohort_copy, value, message):
    images = pd.read_csv(cohort_copy / "images.csv", dtype=str, keep_default_na=False)
    images.loc[2, "nm_per_pixel"] = value
    images.to_csv(cohort_copy / "images.csv", index=False)
    with pytest.raises(CohortError, match=rf"images.csv, row 3 .*nm_per_pixel '{value}' {message}"):
        load_cohort(cohort_copy, check_images="none")


def test_duplicate_columns_and_header_only_tables_are_refused(cohort_copy):
    reports = (cohort_copy / "reports.csv").read_text().splitlines()
    header = reports[0].split(",")
    (cohort_copy / "reports.csv").write_text("\n".join([",".join(header + ["report"])]
                                                      + [r + ",other text" for r in reports[1:]]) + "\n")
    with pytest.raises(CohortError, match=r"reports.csv: duplicate column\(s\) 'report'"):
        load_cohort(cohort_copy, check_images="none")
    (cohort_copy / "reports.csv").write_text(reports[0] + "\n")
    with pytest.raises(CohortError, match="reports.csv: the table has a header but no rows"):
        load_cohort(cohort_copy, check_images="none")


def test_the_labels_cli_never_overwrites_without_force(tmp_path, capsys):
    src = tmp_path / "reports.csv"
    pd.DataFrame({"patient_id": ["P1"], "report": ["DIAGNOSIS: minimal change disease."]}).to_csv(src, index=False)
    out = tmp_path / "labels.csv"
    out.write_text("my own labels\n")
    assert labels_main([str(src), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_text() == "my own labels\n"
    assert labels_main([str(src), "--out", str(out), "--force"]) == 0
    assert "minimal change disease" in out.read_text()
    assert os.path.getsize(src) > 0


def test_na_like_diagnoses_are_missing_and_case_variants_take_the_vocabulary_spelling(cohort_copy):
    reports = pd.read_csv(cohort_copy / "reports.csv", dtype=str, keep_default_na=False)
    truth = reports.diagnosis.copy()
    reports.loc[0, "diagnosis"] = "N/A"
    reports.loc[1, "diagnosis"] = " ".join(w.upper() for w in truth[1].split())     # e.g. "IGA NEPHROPATHY"
    reports.to_csv(cohort_copy / "reports.csv", index=False)
    rep = load_cohort(cohort_copy, check_images="none").reports
    assert rep.diagnosis_source[0] in ("labeler", "none") and "given value 'N/A' read as missing" in rep.diagnosis_note[0]
    assert rep.diagnosis[1] == truth[1] and rep.diagnosis_source[1] == "given" and "read as" in rep.diagnosis_note[1]


@pytest.mark.parametrize("text", ["NA", "-", "\u200b", " n/a "])
def test_empty_like_reports_are_refused(cohort_copy, text):
    reports = pd.read_csv(cohort_copy / "reports.csv", dtype=str, keep_default_na=False)
    reports.loc[4, "report"] = text
    reports.to_csv(cohort_copy / "reports.csv", index=False)
    with pytest.raises(CohortError, match=r"reports.csv, row 5 .*report is empty"):
        load_cohort(cohort_copy, check_images="none")


def _problems(folder, **kw) -> list[str]:
    with pytest.raises(CohortError) as err:
        load_cohort(folder, **kw)
    return [str(p) for p in err.value.problems]


def test_a_split_column_only_in_images_csv_is_refused(cohort_copy):
    images = pd.read_csv(cohort_copy / "images.csv")
    reports = pd.read_csv(cohort_copy / "reports.csv")
    images["split"] = images.patient_id.map(dict(zip(reports.patient_id, reports.split)))
    images.to_csv(cohort_copy / "images.csv", index=False)
    reports.drop(columns="split").to_csv(cohort_copy / "reports.csv", index=False)
    assert _problems(cohort_copy) == ["images.csv: has a split column but reports.csv does not: splits are per "
                                      "patient and read from reports.csv only; move the column there (or delete it "
                                      "for seeded splits)"]


def _two_patients(cohort: Path, same_split: bool):
    """(images table, row index of a train image, row index of an image of another patient in train or test)."""
    images = pd.read_csv(cohort / "images.csv")
    split = dict(pd.read_csv(cohort / "reports.csv")[["patient_id", "split"]].values)
    split_of = images.patient_id.map(split)
    src = images.index[split_of == "train"][0]
    other = images.index[(split_of == ("train" if same_split else "test"))
                         & (images.patient_id != images.patient_id[src])][0]
    return images, src, other


@pytest.mark.parametrize("how, level, what", [("hardlink", "exists", "the same file"),
                                              ("copy", "decode", "identical pixels")])
def test_content_shared_across_splits_is_leakage(cohort_copy, how, level, what):
    images, src, other = _two_patients(cohort_copy, same_split=False)
    target = cohort_copy / images.path[other]
    target.unlink()
    if how == "hardlink":
        os.link(cohort_copy / images.path[src], target)
    else:   # the same pixels under another name: a TIFF re-saved as PNG
        from PIL import Image
        import tifffile
        new = target.with_suffix(".png")
        Image.fromarray(tifffile.imread(cohort_copy / images.path[src])).save(new)
        images.loc[other, "path"] = str(Path(images.path[other]).with_suffix(".png"))
        images.to_csv(cohort_copy / "images.csv", index=False)
    problems = _problems(cohort_copy, check_images=level)
    assert problems == [f"images.csv, row {other + 1} (patient {images.patient_id[other]}): {what} as row {src + 1} "
                        f"(patient {images.patient_id[src]}, train split): leakage across splits (test here); "
                        f"remove the copy or fix the patient"]
    kept = load_cohort(cohort_copy, check_images=level, drop_invalid=True)   # --drop-invalid drops the copy only
    assert kept.dropped["images"] == 1 and len(kept.images) == len(images) - 1


def test_content_shared_within_a_split_is_a_warning(cohort_copy):
    images, src, other = _two_patients(cohort_copy, same_split=True)
    target = cohort_copy / images.path[other]
    target.unlink()
    os.link(cohort_copy / images.path[src], target)
    cohort = load_cohort(cohort_copy)
    assert cohort.content_warnings == [f"images.csv, row {other + 1} (patient {images.patient_id[other]}): the same "
                                       f"file as row {src + 1} (patient {images.patient_id[src]}, train split)"]
    assert cohort.summary()["shared_images"] == 1 and "_file_id" not in cohort.images.columns


def test_cohorts_too_small_for_the_splits_are_refused(cohort_copy, capsys):
    from emclip.data.__main__ import main as check_main
    reports = pd.read_csv(cohort_copy / "reports.csv")
    images = pd.read_csv(cohort_copy / "images.csv")
    one = reports.patient_id[0]
    reports[reports.patient_id == one].drop(columns="split").to_csv(cohort_copy / "reports.csv", index=False)
    images[images.patient_id == one].to_csv(cohort_copy / "images.csv", index=False)
    assert check_main(["check", str(cohort_copy), "--images", "none"]) == 2
    assert ("reports.csv: the val and test splits are empty (1 train, 0 val, 0 test): training needs train and val, "
            "evaluation needs test; 1 patient(s) are too few for seeded 70/15/15 splits: add patients or a split "
            "column") in capsys.readouterr().out
    reports.assign(split="test").to_csv(cohort_copy / "reports.csv", index=False)   # every patient in test
    images.to_csv(cohort_copy / "images.csv", index=False)
    assert _problems(cohort_copy, check_images="none") == [
        "reports.csv: the train and val splits are empty (0 train, 0 val, 20 test): training needs train and val, "
        "evaluation needs test; the split column leaves it empty: give every split patients"]


def test_the_train_cli_prints_refusals_as_one_line(tmp_path, capsys):
    from emclip.train.__main__ import main as train_main
    code = train_main(["ci", f"data_dir={tmp_path / 'typo'}", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: data_dir ") and "Traceback" not in err
    assert "a data_dir you name is never generated into" in err


def test_a_misspelt_training_parameter_is_refused_naming_it(tmp_path):
    """In an override and in a parameter file: refused with the name, never silently ignored."""
    with pytest.raises(ValueError, match=r"unknown training parameter\(s\): scale_embedd; known: .*scale_embed"):
        load_config("ci", {"scale_embedd": False})
    params = tmp_path / "mine.yaml"
    params.write_text("train:\n  model: tiny\n  epochz: 3\n")
    with pytest.raises(ValueError, match=r"unknown training parameter\(s\): epochz"):
        load_config(params)


@pytest.mark.parametrize("text,value", [("false", False), ("False", False), (" no ", False), ("0", False),
                                        ("off", False), ("true", True), ("yes", True), ("1", True)])
def test_papermill_strings_for_booleans_mean_what_they_say(text, value):
    """papermill's ``-p scale_embed false`` passes the string "false", which Python reads as true."""
    cfg = load_config("ci", {"scale_embed": text, "scale_attention": "false", "epochs": "3", "lr": "0.01"})
    assert cfg.scale_embed is value and cfg.scale_attention is False
    assert cfg.epochs == 3 and cfg.lr == 0.01
    with pytest.raises(ValueError, match=r"scale_embed='maybe' is not a valid bool"):
        load_config("ci", {"scale_embed": "maybe"})


def test_a_diagnosis_outside_the_bundled_classes_keeps_the_renal_prompts_for_the_rest_with_a_warning():
    from types import SimpleNamespace
    from emclip.evaluation import load_prompts
    from emclip.evaluation.runs import prompt_classes
    renal = load_prompts("renal_em")
    cohort = SimpleNamespace(reports=pd.DataFrame({"diagnosis": ["minimal change disease", "oncocytoma", None]}))
    with pytest.warns(UserWarning, match=r"1 diagnosis value\(s\) are not among the bundled renal classes and are "
                                         r"prompted by name only: 'oncocytoma'"):
        prompts = prompt_classes(cohort)
    assert prompts.classes == ["minimal change disease", "oncocytoma"] and prompts.templates == renal.templates
    assert prompts.synonyms["minimal change disease"] == renal.synonyms["minimal change disease"]
    assert prompts.synonyms["oncocytoma"] == ["oncocytoma"]
    covered = prompt_classes(SimpleNamespace(reports=pd.DataFrame({"diagnosis": ["normal", "amyloidosis"]})))
    assert covered.classes == renal.classes and covered.synonyms == renal.synonyms   # all bundled: the full set


def test_images_read_with_a_warning_are_listed_by_check_with_their_row(cohort_copy, capsys):
    import numpy as np
    import tifffile
    from emclip.data.__main__ import main as check_main
    images = pd.read_csv(cohort_copy / "images.csv")
    pixels = np.linspace(0, 1, 48 * 48, dtype=np.float32).reshape(48, 48)
    pixels[0, :3] = np.inf
    tifffile.imwrite(cohort_copy / images.path[4], pixels)
    assert check_main(["check", str(cohort_copy), "--workers", "2"]) == 0
    out = capsys.readouterr()
    assert (f"warning: images.csv, row 5 (patient {images.patient_id[4]}): {cohort_copy / images.path[4]}: 3 of 2304 "
            f"pixel values are NaN or inf; ignored for the intensity range and set to 0") in out.err
    assert "read with a warning 1 image(s)" in out.out
