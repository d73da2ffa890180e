"""Diagnoses from reports in the cohort contract: given | labeler | none, and every consumer saying which it used."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from emclip.data import CohortError, LabelOptions, load_cohort
from emclip.data.__main__ import main as check_main
from emclip.labels.__main__ import main as labels_main

REPO = Path(__file__).resolve().parents[1]


def _strip(cohort: Path, keep: int = 0) -> pd.DataFrame:
    """Blank the diagnosis of every patient but the first ``keep`` (drop the column when keep == 0); return the
    original table (the truth)."""
    truth = pd.read_csv(cohort / "reports.csv", dtype=str, keep_default_na=False)
    stripped = truth.copy()
    if keep:
        stripped.loc[keep:, "diagnosis"] = ""
    else:
        stripped = stripped.drop(columns=["diagnosis"])
    stripped.to_csv(cohort / "reports.csv", index=False)
    return truth


def test_a_cohort_without_diagnoses_gets_them_from_the_reports(cohort_copy):
    truth = _strip(cohort_copy)
    cohort = load_cohort(cohort_copy, check_images="none")
    rep = cohort.reports.merge(truth[["patient_id", "diagnosis"]], on="patient_id", suffixes=("", "_true"))
    assert set(rep.diagnosis_source) <= {"labeler", "none"} and (rep.diagnosis_source == "labeler").sum() >= 10
    labelled = rep[rep.diagnosis_source == "labeler"]
    assert (labelled.diagnosis == labelled.diagnosis_true).all()      # the generator's reports state the truth
    none = rep[rep.diagnosis_source == "none"]
    assert none.diagnosis.isna().all() and none.diagnosis_note.str.contains("only hedged").all()
    assert labelled.diagnosis_note.str.startswith("renal labeler").all()
    s = cohort.summary()["labels"]
    assert s["sources"] == {"given": 0, "labeler": len(labelled), "none": len(none)}
    assert s["hedged"] == len(none) and s["labeler"] == "report labeler (renal)"
    assert sum(v["none"] for v in s["by_split"].values()) == len(none)


def test_hedged_diagnoses_can_be_counted_and_given_ones_are_never_replaced(cohort_copy):
    truth = _strip(cohort_copy, keep=5)
    reports = pd.read_csv(cohort_copy / "reports.csv", dtype=str, keep_default_na=False)
    reports.loc[0, "diagnosis"] = "my own label"      # a given diagnosis wins even when the report says otherwise
    reports.to_csv(cohort_copy / "reports.csv", index=False)
    cohort = load_cohort(cohort_copy, check_images="none", labels=LabelOptions(uncertain="positive"))
    rep = cohort.reports.set_index("patient_id")
    first = truth.patient_id.iloc[0]
    assert rep.loc[first, "diagnosis"] == "my own label" and rep.loc[first, "diagnosis_source"] == "given"
    assert (rep.diagnosis_source == "given").sum() == 5
    assert (rep.diagnosis_source == "none").sum() == 0                 # hedged ones counted as positive
    assert cohort.summary()["labels"]["hedged"] > 0
    assert rep.diagnosis_note[rep.diagnosis_note.str.contains("hedged")].str.contains("counted as positive").all()


def test_no_labeler_means_no_diagnosis_and_check_says_so(cohort_copy, capsys):
    _strip(cohort_copy)
    cohort = load_cohort(cohort_copy, check_images="none", labels=LabelOptions(vocab=None))
    assert (cohort.reports.diagnosis_source == "none").all() and not cohort.has_diagnosis
    assert check_main(["check", str(cohort_copy), "--images", "none", "--label-vocab", "none"]) == 0
    out = capsys.readouterr().out
    assert "0 given, 20 none (no labeler: label_vocab is none)" in out
    assert "zero-shot evaluation, the probe and the diagnosis audit will be skipped" in out
    assert check_main(["check", str(cohort_copy), "--images", "none"]) == 0
    out = capsys.readouterr().out
    n_lab = int((load_cohort(cohort_copy, check_images="none").reports.diagnosis_source == "labeler").sum())
    assert f"0 given, {n_lab} from the report labeler (renal)" in out and "hedged diagnoses" in out


def test_splits_are_stratified_by_the_derived_diagnoses(cohort_copy):
    truth = _strip(cohort_copy)
    reports = pd.read_csv(cohort_copy / "reports.csv", dtype=str, keep_default_na=False).drop(columns=["split"])
    reports.to_csv(cohort_copy / "reports.csv", index=False)
    with_dx = load_cohort(cohort_copy, check_images="none")
    blind = load_cohort(cohort_copy, check_images="none", labels=LabelOptions(vocab=None))
    assert with_dx.split_source == "seeded"
    # with labels, every derived diagnosis with >= 2 patients has one in train; splits differ from the unlabelled way
    for dx, group in with_dx.reports.groupby("diagnosis"):
        if len(group) >= 2:
            assert (group.split == "train").any(), dx
    assert list(with_dx.reports.split) != list(blind.reports.split)
    assert len(truth) == len(with_dx.reports)


def test_a_labels_file_written_once_is_used_instead(cohort_copy, tmp_path, capsys):
    _strip(cohort_copy)
    labels_csv = tmp_path / "labels.csv"
    assert labels_main([str(cohort_copy / "reports.csv"), "--out", str(labels_csv)]) == 0
    assert not (cohort_copy / "labels.csv").exists()              # nothing written beside the user's reports
    table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    hedged = set(table.patient_id[table.primary_value == "-1"])
    table = table[table.patient_id != table.patient_id.iloc[-1]]   # one patient missing from the file
    table.to_csv(labels_csv, index=False)
    cohort = load_cohort(cohort_copy, check_images="none", labels=LabelOptions(labels_file=labels_csv))
    rep = cohort.reports.set_index("patient_id")
    missing = rep.index[-1] if rep.index[-1] not in set(table.patient_id) else None
    assert rep.diagnosis_note.str.contains("labels file labels.csv").any()
    if missing:
        assert rep.loc[missing, "diagnosis_source"] == "none" and "not in labels file" in rep.loc[missing,
                                                                                                 "diagnosis_note"]
    assert all(rep.loc[p, "diagnosis_source"] == "none" for p in hedged if p in rep.index)
    on_the_fly = load_cohort(cohort_copy, check_images="none").reports.set_index("patient_id")
    same = [p for p in table.patient_id]
    assert (on_the_fly.loc[same, "diagnosis"].fillna("") == rep.loc[same, "diagnosis"].fillna("")).all()
    broken = tmp_path / "broken.csv"
    pd.DataFrame({"patient": ["x"], "primary_diagnosis": ["normal"]}).to_csv(broken, index=False)
    with pytest.raises(CohortError, match=r"broken.csv: missing column\(s\): patient_id"):
        load_cohort(cohort_copy, check_images="none", labels=LabelOptions(labels_file=broken))
    with pytest.raises(CohortError, match="labels file not found"):
        load_cohort(cohort_copy, check_images="none", labels=LabelOptions(labels_file=tmp_path / "nope.csv"))


def test_derived_labels_are_cached_and_the_cache_follows_the_text(cohort_copy, tmp_path, monkeypatch):
    _strip(cohort_copy)
    options = LabelOptions(cache_dir=tmp_path / "cache")
    first = load_cohort(cohort_copy, check_images="none", labels=options)
    assert len(list((tmp_path / "cache" / "labels").glob("*.csv"))) == 1

    from emclip.labels import labeler

    def refuse(self, text):
        raise AssertionError("labelled again although the cache holds these reports")
    monkeypatch.setattr(labeler.Labeler, "label", refuse)
    again = load_cohort(cohort_copy, check_images="none", labels=options)
    assert again.reports[["diagnosis", "diagnosis_source", "diagnosis_note"]].equals(
        first.reports[["diagnosis", "diagnosis_source", "diagnosis_note"]])
    reports = pd.read_csv(cohort_copy / "reports.csv", dtype=str, keep_default_na=False)
    reports.loc[0, "report"] += " Addendum."
    reports.to_csv(cohort_copy / "reports.csv", index=False)
    with pytest.raises(AssertionError, match="labelled again"):   # a changed report is labelled afresh
        load_cohort(cohort_copy, check_images="none", labels=options)


def test_metrics_say_where_the_labels_came_from():
    from emclip.evaluation import Embeddings, evaluate
    rng = np.random.default_rng(0)
    n = 12
    dx = ["a", "b", "c"] * 4
    src = ["labeler"] * 9 + ["none"] * 3
    dx = [d if s != "none" else "" for d, s in zip(dx, src)]
    emb = Embeddings(patient_ids=[f"p{i}" for i in range(n)], split=["test"] * 6 + ["train"] * 6, diagnosis=dx,
                     patient=rng.normal(size=(n, 4)), report=rng.normal(size=(n, 4)), image=np.zeros((0, 4)),
                     image_patient=[], image_paths=[], image_scales=[], image_attention=[], logit_scale=10.0,
                     meta={"labels": {"labeler": "report labeler (renal)", "uncertain": "exclude"}},
                     diagnosis_source=src)

    def encode(texts):
        return rng.normal(size=(len(texts), 4))
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        m = evaluate(emb, encode, 10.0, d, classes=["a", "b", "c"], split=None, n_boot=10, probe=False,
                     figures=False)
    assert m["labels"]["source"] == "labeler" and m["labels"]["sources"] == {"given": 0, "labeler": 9, "none": 3}
    assert m["labels"]["n_no_diagnosis"] == 3 and m["zero_shot"]["patient"]["n"] == 9
    assert m["labels"]["labeler"] == "report labeler (renal)"
    from emclip.summary import label_sentence
    text = label_sentence(m)
    assert "9 labeler" in text and "report labeler (renal)" in text and "3 without a usable diagnosis" in text


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_notebooks_01_to_05_and_the_ablation_run_on_a_cohort_without_diagnoses(tiny_cohort, tmp_path):
    """The issue's acceptance: the cohort with its diagnosis column removed goes through 01 -> 05 and the ablation
    with no other change, labels from the labeler, and the source stated in every report."""
    import shutil
    cohort = Path(shutil.copytree(tiny_cohort, tmp_path / "cohort"))
    _strip(cohort)
    params = yaml.safe_load((REPO / "params" / "ci.yaml").read_text())
    params["name"] = "nodx"
    params["train"].update(data_dir=str(cohort), run_dir=str(tmp_path / "runs" / "main"),
                           cache_dir=str(tmp_path / "cache"), epochs=1, batch_size=4)
    params["ablations"] = {"scale_mode": ["film"], "aggregator": ["mean"], "scale_embed": [True, False],
                           "seeds": [0]}
    params["evaluation"]["bootstrap"] = 20
    pfile = tmp_path / "nodx.yaml"
    pfile.write_text(yaml.safe_dump(params))
    reports = tmp_path / "reports"
    reports.mkdir()
    env = dict(os.environ, EMCLIP_PARAMS="ci")
    for nb, extra in (("01_data_audit", []), ("02_features", []), ("03_train", []),
                      ("04_ablations", ["-p", "runs_dir", str(tmp_path / "runs")]), ("05_evaluation", [])):
        out = reports / f"{nb}.ipynb"
        extra_report = [] if nb == "03_train" else ["-p", "report_dir", str(reports / nb)]
        res = subprocess.run([sys.executable, "-m", "papermill", f"{nb}.ipynb", str(out), "--no-progress-bar",
                              "-p", "params", str(pfile), *extra_report, *extra], cwd=REPO / "notebooks",
                             capture_output=True, text=True, timeout=900, env=env)
        assert res.returncode == 0, f"{nb}: {res.stderr[-3000:]}"
        text = out.read_text()
        if nb == "01_data_audit":
            assert "from the report labeler (renal)" in text and "agreement cannot be measured" in text
        elif nb != "02_features":
            assert "from the report labeler (renal)" in text, nb
    metrics = json.loads((tmp_path / "runs" / "main" / "eval" / "metrics.json").read_text())
    assert metrics["labels"]["source"] == "labeler" and metrics["labels"]["sources"]["given"] == 0
    zs = metrics["zero_shot"]["patient"]
    assert zs["n"] == metrics["labels"]["sources"]["labeler"] - metrics["labels"]["n_diagnosis_not_in_classes"]
    assert zs["n"] + zs["n_excluded"]["no_diagnosis"] + zs["n_excluded"]["diagnosis_not_in_classes"] == \
        metrics["n_patients"]
    assert "from the report labeler (renal)" in (reports / "04_ablations" / "ablation.md").read_text()
    assert not (cohort / "labels.csv").exists() and sorted(p.name for p in cohort.iterdir() if p.is_file()) == [
        "images.csv", "reports.csv"]


def test_the_generator_can_leave_the_diagnosis_out(tmp_path):
    from emclip.synthetic import generate_cohort
    out = generate_cohort(tmp_path / "c", n_patients=12, seed=5, image_size=32, workers=1, progress=False,
                          with_diagnosis=False)
    assert "diagnosis" not in pd.read_csv(out / "reports.csv").columns
    truth = pd.read_csv(out / "diagnosis_truth.csv").set_index("patient_id").diagnosis
    cohort = load_cohort(out, check_images="exists")
    rep = cohort.reports.set_index("patient_id")
    assert set(rep.diagnosis_source) <= {"labeler", "none"} and (rep.diagnosis_source == "labeler").any()
    labelled = rep[rep.diagnosis_source == "labeler"]
    assert (labelled.diagnosis == truth[labelled.index]).all()
