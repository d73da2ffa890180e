"""The six notebooks as the suite's notebook test: 01 -> 06 run once with the ci parameter set, then what matters
is compared (in the spirit of recommenders' notebook tests), not stored outputs (notebooks are committed without
outputs, so there is nothing to compare them with):

* every notebook ran, with no error output and nothing a reader must not see (``emclip.reports.report_problems``:
  warnings, tracebacks, kernel log lines) in its outputs or its HTML report;
* every expected figure is there: the number of image/png outputs per notebook, and every PNG file it writes
  exists, is non-empty and decodes;
* the key numbers recorded in the JSON files the notebooks write match ``tests/data/notebook_expectations.yaml``
  within tolerance, and structural facts hold (classes, patients per split, CI ordering, the ablation's arms,
  03 and 05 agreeing on the same checkpoint, 06 predicting every patient of the cohort it is given and nothing
  else, as the API does).

Everything is written below a temporary folder: the cohort is generated there, the feature cache, the runs and
the reports live there too (a copy of params/ci.yaml names those folders). 06 is given a cohort of new patients of
its own (images only, as the least a new archive has) through its ``data_dir`` parameter.
"""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from emclip.reports import execute_notebook, report_problems

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_data_audit", "02_features", "03_train", "04_ablations", "05_evaluation", "06_inference")
REPORT_SUBFOLDERS = {"05_evaluation": "evaluation", "06_inference": "inference"}
EXPECT = yaml.safe_load((REPO / "tests" / "data" / "notebook_expectations.yaml").read_text())
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    """Run 01 -> 06 like ``emclip.pipeline.run_all`` chains them; returns (root, {notebook: path or exception})."""
    from emclip.synthetic import generate_cohort
    root = tmp_path_factory.mktemp("ci_notebooks")
    params = yaml.safe_load((REPO / "params" / "ci.yaml").read_text())
    params["name"] = "ci-notebook-outputs"
    params["train"]["data_dir"] = str(root / "cohort")
    params["train"].update(run_dir=str(root / "runs" / "main"), cache_dir=str(root / "cache"))
    params["inference"]["data_dir"] = str(root / "set_new_patients")     # 06 is given data_dir: never generated
    new = generate_cohort(root / "new_patients", n_patients=EXPECT["new_patients"], seed=5, image_size=48,
                          workers=1, progress=False, with_diagnosis=False)
    for name in ("reports.csv", "diagnosis_truth.csv"):                  # images.csv alone
        (new / name).unlink()
    pfile = root / "ci-notebook-outputs.yaml"
    pfile.write_text(yaml.safe_dump(params))
    reports = root / "reports"
    results = {}
    for name in NOTEBOOKS:
        parameters = {"params": str(pfile)}
        if name != "03_train":   # 03 writes into its run folder, 05 into reports/evaluation, 06 reports/inference
            parameters["report_dir"] = str(reports / REPORT_SUBFOLDERS[name] if name in REPORT_SUBFOLDERS
                                           else reports)
        if name == "06_inference":
            parameters["data_dir"] = str(new)
        try:
            results[name] = execute_notebook(name, reports, parameters)
        except Exception as err:     # noqa: BLE001 - reported by the notebook's own tests, the others still run
            results[name] = err
    return root, results


def _executed(ci_run, name: str) -> nbformat.NotebookNode:
    root, results = ci_run
    result = results[name]
    if isinstance(result, Exception):
        pytest.fail(f"{name} failed: {type(result).__name__}: {str(result)[-3000:]}")
    return nbformat.read(str(result), as_version=4)


def _outputs(nb):
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def _output_text(out) -> str:
    if out.output_type == "stream":
        return out.text
    if out.output_type == "error":
        return "\n".join(out.traceback)
    data = out.get("data", {})
    return "\n".join(str(data[k]) for k in ("text/plain", "text/html", "text/markdown") if k in data)


def _png_outputs(nb) -> list[bytes]:
    return [base64.b64decode(out.data["image/png"]) for out in _outputs(nb) if "image/png" in out.get("data", {})]


def _check_png(data: bytes, what: str) -> None:
    assert data, f"{what} is empty"
    with Image.open(io.BytesIO(data)) as im:
        im.load()   # decodes every pixel: a truncated file fails here
        side = EXPECT["min_pixels"]
        assert min(im.size) >= side, f"{what} is only {im.size[0]}x{im.size[1]} pixels"


def _clean(nb, what: str) -> None:
    errors = [out for out in _outputs(nb) if out.output_type == "error"]
    assert not errors, f"{what}: error output {errors[0].ename}: {errors[0].evalue}"
    problems = report_problems("\n".join(_output_text(out) for out in _outputs(nb)))
    assert problems == [], f"{what}: {problems}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_clean(ci_run, name):
    nb = _executed(ci_run, name)
    _clean(nb, name)
    html = Path(ci_run[1][name]).with_suffix(".html")
    assert report_problems(html.read_text()) == [], html


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_figure_is_there(ci_run, name):
    root = ci_run[0]
    nb = _executed(ci_run, name)
    expect = EXPECT["notebooks"][name]
    pngs = _png_outputs(nb)
    assert len(pngs) == expect["png_outputs"], f"{name} shows {len(pngs)} figures, expected {expect['png_outputs']}"
    for i, data in enumerate(pngs):
        _check_png(data, f"{name} figure output {i + 1}")
    for rel in expect["figures"]:
        path = root / rel
        assert path.is_file(), f"{name} did not write {rel}"
        _check_png(path.read_bytes(), rel)


def test_each_ablation_arm_ran_03_with_its_figure(ci_run):
    root = ci_run[0]
    _executed(ci_run, "04_ablations")
    expect = EXPECT["notebooks"]["04_ablations"]
    for arm in expect["arms"]:
        nb = nbformat.read(str(root / "reports" / "ablations" / arm / "03_train.ipynb"), as_version=4)
        _clean(nb, f"04's run of 03 for {arm}")
        assert len(_png_outputs(nb)) == expect["nested_png_outputs"], arm
        metrics = json.loads((root / "runs" / arm / "eval" / "metrics.json").read_text())
        assert metrics["meta"]["scale_embed"] is arm.endswith("-aware-s0"), arm      # the arm is what it says
        assert metrics["meta"]["scale_mode"] == arm.split("-")[0], arm


def _lookup(data, dotted: str):
    value = data
    for part in dotted.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


@pytest.mark.parametrize("rel", sorted(EXPECT["numbers"]))
def test_key_numbers_are_recorded_within_tolerance(ci_run, rel):
    root = ci_run[0]
    for name in NOTEBOOKS:
        _executed(ci_run, name)   # a failed notebook fails here first, with its own message
    data = json.loads((root / rel).read_text())
    wrong = []
    for key, want in EXPECT["numbers"][rel].items():
        got = _lookup(data, key)
        if not isinstance(got, (int, float)) or isinstance(got, bool) or not math.isfinite(got) \
                or abs(got - want["value"]) > want["tol"]:
            wrong.append(f"{key} = {got!r}, expected {want['value']} +- {want['tol']}")
    assert not wrong, f"{rel}: " + "; ".join(wrong)


def _intervals(node, path=""):
    """Every {value, ci_low, ci_high} record below ``node`` (with its dotted path)."""
    if isinstance(node, dict):
        if {"value", "ci_low", "ci_high"} <= set(node):
            yield path, node
        for k, v in node.items():
            yield from _intervals(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _intervals(v, f"{path}.{i}")


def test_evaluation_structure(ci_run):
    """Facts any correct evaluation of the ci run has, whatever the tiny random model learnt."""
    root = ci_run[0]
    _executed(ci_run, "05_evaluation")
    metrics = json.loads((root / "reports" / "evaluation" / "metrics.json").read_text())
    audit = json.loads((root / "reports" / "audit.json").read_text())
    assert metrics["split"] == "test" and metrics["n_patients"] == audit["summary"]["splits"]["test"]
    assert len(metrics["classes"]) == EXPECT["n_classes"] == len(set(metrics["classes"]))
    zs = metrics["zero_shot"]["patient"]
    assert sum(zs["support"].values()) == zs["n"] == metrics["n_patients"]
    assert sum(map(sum, zs["confusion_matrix"]["matrix"])) == zs["n"]
    assert sorted(zs["classes_absent"]) == sorted(c for c, n in zs["support"].items() if n == 0)
    # every confidence interval contains its estimate; every rate lies in [0, 1]
    # (a percentile interval of a skewed statistic may exclude its estimate: that is checked for the headline
    # patient-level zero-shot metrics and the recalls, means over patients)
    records = list(_intervals(metrics))
    assert len(records) > 30
    for path, r in records:
        if r["value"] is None:
            continue
        assert r["ci_low"] <= r["ci_high"], (path, r)
        if path.startswith(("zero_shot.patient.", "retrieval.")):
            assert r["ci_low"] - 1e-9 <= r["value"] <= r["ci_high"] + 1e-9, (path, r)
        if "recall" in path or "auc" in path or "accuracy" in path:
            assert 0 <= r["ci_low"] <= r["ci_high"] <= 1, (path, r)
    # Recall@K grows with K, and reaches 1 once K covers the gallery
    for name, task in metrics["retrieval"].items():
        recall = [task["recall"][k]["value"] for k in sorted(task["recall"], key=int)]
        assert recall == sorted(recall), name
        if task["n_queries_without_positive"] == 0 and task["n_items"] <= 50:
            assert task["recall"]["50"]["value"] == 1.0, name
    # the probe trains on train + val and is scored on the test patients only
    probe = metrics["linear_probe"]
    assert (probe["n_train"], probe["n_val"], probe["n_test"]) == tuple(
        audit["summary"]["splits"][s] for s in ("train", "val", "test"))
    # 03 evaluated the same best checkpoint on the same split: 05 must report the same numbers
    from_03 = json.loads((root / "runs" / "main" / "eval" / "metrics.json").read_text())
    assert from_03["headline"] == metrics["headline"]


def test_ablation_table_has_every_arm(ci_run):
    root = ci_run[0]
    _executed(ci_run, "04_ablations")
    table = json.loads((root / "reports" / "metrics.json").read_text())
    arms = EXPECT["notebooks"]["04_ablations"]["arms"]
    assert [r["arm"] for r in table["per_run"]] == arms
    for row in table["per_run"]:
        run = json.loads((root / "runs" / row["arm"] / "eval" / "metrics.json").read_text())
        assert row["zero-shot AUC"] == pytest.approx(run["zero_shot"]["patient"]["roc_auc_macro_ovr"]["value"],
                                                     abs=1e-6), row["arm"]
    # one paired difference per variant (mode x aggregator) and metric, per seed and pooled
    variants = {r["variant"] for r in table["paired_differences"]}
    assert variants == {a.rsplit("-", 2)[0] for a in arms}
    for r in table["paired_differences"]:
        if r["aware − blind"] is not None:
            assert r["aware − blind"] == pytest.approx(r["aware"] - r["blind"], abs=1e-6)
            assert r["ci_low"] <= r["aware − blind"] + 1e-9 and r["aware − blind"] <= r["ci_high"] + 1e-9
    summary = (root / "reports" / "ablation.md").read_text()
    for arm in arms:
        assert f"| {arm}" in summary, arm


def test_inference_predicts_every_patient_of_the_cohort_it_is_given_as_the_api_does(ci_run):
    """06 on its data_dir (not the set's own cohort, which stays ungenerated): one prediction per patient, every
    image counted, the API's own numbers, an index of the same patients, and nothing written into the cohort."""
    import emclip
    from emclip.serving.index import EmbeddingIndex
    root = ci_run[0]
    _executed(ci_run, "06_inference")
    new, out = root / "new_patients", root / "reports" / "inference"
    images = pd.read_csv(new / "images.csv")
    table = pd.read_csv(out / "predictions.csv")
    assert sorted(table.patient_id) == sorted(images.patient_id.unique())
    assert table.n_images.sum() == len(images) and "diagnosis" not in table      # images only: no diagnosis
    assert not (root / "set_new_patients").exists()
    assert all(p.name == "images.csv" or p.relative_to(new).parts[0] == "images" for p in new.rglob("*"))
    again = emclip.load(root / "runs" / "main").predict(new, progress=False)
    probs = [c for c in table.columns if c.startswith(("patient_p[", "prior_corrected_p["))]
    assert len(probs) == 2 * EXPECT["n_classes"]
    assert np.allclose(table[probs].to_numpy(), again[probs].to_numpy(), atol=1e-5)
    assert list(table.patient_pred) == list(again.patient_pred)
    index = EmbeddingIndex.load(out / "index")
    assert sorted(index.patients.patient_id) == sorted(table.patient_id) and index.n_images == len(images)
    record = json.loads((out / "inference.json").read_text())
    assert set(record["query_patients"]) <= set(table.patient_id) and record["similar_to"] not in record["similar"]
