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
