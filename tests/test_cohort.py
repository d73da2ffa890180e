"""The cohort contract: every rule has a broken cohort whose exact problem (file, row, message) must be named."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emclip.data import CohortError, load_cohort, validate_cohort


def _tables(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (pd.read_csv(root / "images.csv", dtype=str, keep_default_na=False),
            pd.read_csv(root / "reports.csv", dtype=str, keep_default_na=False))


def _save(root: Path, images: pd.DataFrame | None = None, reports: pd.DataFrame | None = None) -> None:
    if images is not None:
        images.to_csv(root / "images.csv", index=False)
    if reports is not None:
        reports.to_csv(root / "reports.csv", index=False)


def _problems(root: Path, check="decode") -> list[str]:
    cohort, problems = validate_cohort(root, check_images=check)
    assert cohort is None, "a broken cohort must not load"
    return [str(p) for p in problems]


def test_valid_cohort_loads_with_summary(tiny_cohort):
    cohort, problems = validate_cohort(tiny_cohort, check_images="decode")
    assert problems == []
    s = cohort.summary()
    assert s["patients"] == 20 and s["images"] == len(pd.read_csv(tiny_cohort / "images.csv"))
    assert sum(s["splits"].values()) == 20 and s["split_source"] == "column"
    assert len(s["diagnoses"]) == 10
    assert 2.0 <= s["nm_per_pixel"]["min"] <= s["nm_per_pixel"]["max"] <= 100.0


def test_missing_table(cohort_copy):
    (cohort_copy / "images.csv").unlink()
    assert any(p.startswith("images.csv: missing table") for p in _problems(cohort_copy))


@pytest.mark.parametrize("table,column", [("images", "nm_per_pixel"), ("images", "path"), ("reports", "report"),
                                          ("reports", "patient_id")])
def test_missing_column(cohort_copy, table, column):
    images, reports = _tables(cohort_copy)
    df = images if table == "images" else reports
    _save(cohort_copy, **{table: df.drop(columns=[column])})
    problems = _problems(cohort_copy)
    assert any(p.startswith(f"{table}.csv: missing column(s): {column}") for p in problems), problems


@pytest.mark.parametrize("value,expected", [("", "nm_per_pixel is missing"), ("abc", "nm_per_pixel 'abc' is not a number"),
                                            ("0", "nm_per_pixel '0' must be > 0"), ("-3.5", "nm_per_pixel '-3.5' must be > 0"),
                                            ("inf", "nm_per_pixel 'inf' is not finite"), ("nan", "nm_per_pixel 'nan' is not finite")])
def test_bad_scale(cohort_copy, value, expected):
    images, _ = _tables(cohort_copy)
    images.loc[4, "nm_per_pixel"] = value
    _save(cohort_copy, images=images)
    pid = images.loc[4, "patient_id"]
    assert f"images.csv, row 5 (patient {pid}): {expected}" in _problems(cohort_copy)


def test_unknown_patient_in_images(cohort_copy):
    images, _ = _tables(cohort_copy)
    images.loc[2, "patient_id"] = "P99999"
    _save(cohort_copy, images=images)
    assert "images.csv, row 3 (patient P99999): unknown patient_id (not in reports.csv)" in _problems(cohort_copy)


def test_duplicate_patient_in_reports(cohort_copy):
    _, reports = _tables(cohort_copy)
    reports = pd.concat([reports, reports.iloc[[0]]], ignore_index=True)
    _save(cohort_copy, reports=reports)
    pid = reports.patient_id[0]
    assert f"reports.csv, row 21 (patient {pid}): duplicate patient_id (also row 1)" in _problems(cohort_copy)


def test_patient_in_two_splits(cohort_copy):
    _, reports = _tables(cohort_copy)
    extra = reports.iloc[[0]].copy()
    extra["split"] = "test" if reports.split[0] != "test" else "train"
    _save(cohort_copy, reports=pd.concat([reports, extra], ignore_index=True))
    problems = _problems(cohort_copy)
    assert any(p.startswith(f"reports.csv, row 21 (patient {reports.patient_id[0]}): patient is in two splits")
               for p in problems), problems


def test_patient_in_two_splits_across_tables(cohort_copy):
    images, reports = _tables(cohort_copy)
    pid = reports.patient_id[0]
    images["split"] = images.patient_id.map(dict(zip(reports.patient_id, reports.split)))
    other = "val" if reports.split[0] != "val" else "train"
    images.loc[images.index[images.patient_id == pid][0], "split"] = other
    _save(cohort_copy, images=images)
    problems = _problems(cohort_copy)
    assert any(f"(patient {pid}): patient is in two splits" in p and p.startswith("images.csv, row") for p in problems)


def test_invalid_split_value(cohort_copy):
    _, reports = _tables(cohort_copy)
    reports.loc[1, "split"] = "holdout"
    _save(cohort_copy, reports=reports)
    assert (f"reports.csv, row 2 (patient {reports.patient_id[1]}): split 'holdout' is not one of train, val, test"
            in _problems(cohort_copy))


def test_patient_without_images(cohort_copy):
    images, reports = _tables(cohort_copy)
    pid = reports.patient_id[3]
    _save(cohort_copy, images=images[images.patient_id != pid])
    assert f"reports.csv, row 4 (patient {pid}): patient has no images in images.csv" in _problems(cohort_copy)


def test_patient_without_report(cohort_copy):
    _, reports = _tables(cohort_copy)
    pid = reports.patient_id[5]
    _save(cohort_copy, reports=reports.drop(index=5))
    problems = _problems(cohort_copy)
    assert any(f"(patient {pid}): unknown patient_id (not in reports.csv)" in p for p in problems)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_report(cohort_copy, text):
    _, reports = _tables(cohort_copy)
    reports.loc[6, "report"] = text
    _save(cohort_copy, reports=reports)
    assert f"reports.csv, row 7 (patient {reports.patient_id[6]}): report is empty" in _problems(cohort_copy)


def test_missing_image_file(cohort_copy):
    images, _ = _tables(cohort_copy)
    (cohort_copy / images.path[8]).unlink()
    problems = _problems(cohort_copy, check="exists")
    assert any(p.startswith(f"images.csv, row 9 (patient {images.patient_id[8]}): image file not found")
               for p in problems), problems


@pytest.mark.parametrize("damage", ["garbage", "truncated", "directory"])
def test_corrupt_or_unreadable_image(cohort_copy, damage):
    images, _ = _tables(cohort_copy)
    target = cohort_copy / images.path[9]
    if damage == "garbage":
        target.write_bytes(b"this is not a TIFF file at all" * 10)
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:200])
    else:
        target.unlink()
        target.mkdir()
    problems = _problems(cohort_copy)
    row = f"images.csv, row 10 (patient {images.patient_id[9]}): "
    wanted = "is a directory, not an image file" if damage == "directory" else "cannot decode image"
    assert any(p.startswith(row) and wanted in p for p in problems), problems


def test_duplicate_image_path(cohort_copy):
    images, _ = _tables(cohort_copy)
    images = pd.concat([images, images.iloc[[0]]], ignore_index=True)
    _save(cohort_copy, images=images)
    n = len(images)
    assert any(p.startswith(f"images.csv, row {n} ") and "duplicate image path" in p and "(also row 1)" in p
               for p in _problems(cohort_copy))


def test_load_raises_with_every_problem(cohort_copy):
    images, reports = _tables(cohort_copy)
    images.loc[0, "nm_per_pixel"] = "-1"
    reports.loc[1, "report"] = ""
    _save(cohort_copy, images=images, reports=reports)
    with pytest.raises(CohortError) as err:
        load_cohort(cohort_copy)
    assert len(err.value.problems) == 2 and "row 1" in str(err.value) and "report is empty" in str(err.value)


def test_drop_invalid_counts_what_was_dropped(cohort_copy):
    images, reports = _tables(cohort_copy)
    images.loc[0, "nm_per_pixel"] = "-1"
    reports.loc[1, "report"] = ""
    _save(cohort_copy, images=images, reports=reports)
    n_img_patient1 = int((images.patient_id == reports.patient_id[1]).sum())
    cohort = load_cohort(cohort_copy, drop_invalid=True)
    assert cohort.dropped == {"images": 1 + n_img_patient1, "patients": 1}
    assert len(cohort.images) == len(images) - 1 - n_img_patient1 and len(cohort.reports) == len(reports) - 1
    assert len(cohort.problems) == 2


def test_seeded_stratified_split_without_split_column(cohort_copy):
    _, reports = _tables(cohort_copy)
    _save(cohort_copy, reports=reports.drop(columns=["split"]))
    a = load_cohort(cohort_copy, seed=1)
    b = load_cohort(cohort_copy, seed=1)
    c = load_cohort(cohort_copy, seed=2)
    assert a.split_source == "seeded"
    assert list(a.reports.split) == list(b.reports.split)
    assert list(a.reports.split) != list(c.reports.split)
    assert set(a.reports.split) <= {"train", "val", "test"}


def test_seeded_split_is_70_15_15_by_patient_stratified_and_order_free():
    from emclip.data.splits import assign_splits
    ids = [f"P{i:03d}" for i in range(200)]
    dx = ["normal" if i % 4 else "amyloidosis" for i in range(200)]          # 150 normal, 50 amyloidosis
    split = assign_splits(ids, dx, seed=7)
    assert sorted(split) == ids
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 140, "val": 30, "test": 30}
    rare = [split[p] for p, d in zip(ids, dx) if d == "amyloidosis"]
    assert abs(rare.count("test") - 7.5) <= 1 and abs(rare.count("val") - 7.5) <= 1   # each diagnosis spread
    shuffled = np.random.default_rng(0).permutation(200)
    assert assign_splits([ids[i] for i in shuffled], [dx[i] for i in shuffled], seed=7) == split
    assert assign_splits(ids, dx, seed=8) != split


def test_parquet_tables(cohort_copy):
    images, reports = _tables(cohort_copy)
    images.to_parquet(cohort_copy / "images.parquet")
    (cohort_copy / "images.csv").unlink()
    cohort = load_cohort(cohort_copy)
    assert len(cohort.images) == len(images)


def test_absolute_paths_and_extra_columns_kept(cohort_copy):
    images, _ = _tables(cohort_copy)
    images["path"] = [str(cohort_copy / p) for p in images.path]
    _save(cohort_copy, images=images)
    cohort = load_cohort(cohort_copy)
    assert "magnification" in cohort.images.columns and Path(cohort.images.path[0]).is_absolute()


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emclip.data", "check", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_cli_check_ok(tiny_cohort):
    out = _cli(tiny_cohort)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "patients            20" in out.stdout and "thin basement membrane nephropathy" in out.stdout


def test_cli_check_broken_exits_2_with_one_line_per_problem(cohort_copy):
    images, reports = _tables(cohort_copy)
    images.loc[3, "nm_per_pixel"] = "abc"
    reports.loc[0, "report"] = ""
    _save(cohort_copy, images=images, reports=reports)
    out = _cli(cohort_copy)
    assert out.returncode == 2
    lines = out.stdout.strip().splitlines()
    assert f"images.csv, row 4 (patient {images.patient_id[3]}): nm_per_pixel 'abc' is not a number" in lines
    assert f"reports.csv, row 1 (patient {reports.patient_id[0]}): report is empty" in lines


def test_paths_resolve_as_pathlib_does_with_folders_resolved_once(tmp_path):
    """The images table resolves each folder once per table; the result must be Path.resolve's, symlinked
    folders, symlinked files and '..' through a symlink included."""
    import os
    from emclip.data.cohort import _resolved
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "a.tif").write_bytes(b"x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink(tmp_path / "real" / "a.tif", tmp_path / "real" / "b.tif")
    real_dirs = {}
    for rel in ["link/a.tif", "real/b.tif", "link/../real/a.tif", "real/sub/../a.tif", "link/sub/../b.tif",
                "missing/x.tif", "link", "real/./a.tif"]:
        assert _resolved(tmp_path / rel, real_dirs) == str((tmp_path / rel).resolve()), rel
    assert real_dirs   # folders were remembered
