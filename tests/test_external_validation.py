"""External validation: a trained run scored on another cohort with the whole protocol (evaluation.external,
``evaluate_run(..., data_dir=...)``, ``summary.external_table`` and 05_evaluation's ``data_dir``).

One tiny run trained on the session's 20-patient cohort and a second 12-patient cohort generated with another seed
are shared by the module; both cohorts number their patients from P00001, so their ids collide."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import nbformat
import numpy as np
import pandas as pd
import pytest

from emclip.data import load_cohort
from emclip.evaluation import Embeddings, evaluate
from emclip.evaluation import report as report_module
from emclip.evaluation.cached import evaluate_run, evaluation_key, key_changes
from emclip.evaluation.external import INTERNAL_PREFIX, ExternalCohort, combine_for_external, external_folder
from emclip.paramsets import load_params
from emclip.synthetic import generate_cohort
from emclip.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CI = load_params("ci").evaluation


def _snapshot(folder: Path) -> dict:
    """Every file and folder below ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def validated(tiny_cohort, tmp_path_factory):
    """The run, the external cohort (and its file snapshot from before anything ran), the internal test and the
    external evaluations (ci evaluation settings, as 05_evaluation asks for them) and what they logged."""
    from emclip.train import load_config, train
    root = tmp_path_factory.mktemp("external_validation")
    run = root / "run"
    train(load_config("ci", dict(data_dir=str(tiny_cohort), run_dir=str(run), cache_dir=str(root / "cache"),
                                 epochs=1, batch_size=4, max_instances=3)), log=lambda *_: None)
    hospital = generate_cohort(root / "hospital_b", n_patients=12, seed=11, image_size=48, workers=1, progress=False)
    before = _snapshot(hospital)
    logs = []
    internal = evaluate_run(run, n_boot=CI.bootstrap, topj=CI.topj, log=logs.append)
    internal_files = _snapshot(run / "eval") | {"embeddings.npz": _snapshot(run)["embeddings.npz"]}
    external = evaluate_run(run, n_boot=CI.bootstrap, topj=CI.topj, data_dir=hospital, log=logs.append)
    return SimpleNamespace(root=root, run=run, cohort=Path(tiny_cohort), hospital=hospital, before=before,
                           internal=internal, external=external, internal_files=internal_files, logs=logs)


def _classes_of(metrics, cohort: Path, cfg: TrainConfig) -> tuple[int, int]:
    """(patients of ``cohort``, of them with a diagnosis among the evaluation's classes), as the run derives them."""
    reports = load_cohort(cohort, labels=cfg.label_options(), require_splits=False).reports
    return len(reports), int(reports.diagnosis.isin(metrics["classes"]).sum())


def _run_config(run: Path) -> TrainConfig:
    return TrainConfig(**json.loads((run / "config.json").read_text()))


@pytest.mark.slow
def test_every_external_patient_is_scored_with_the_whole_protocol(validated):
    m = validated.external
    n_patients, n_in_classes = _classes_of(m, validated.hospital, _run_config(validated.run))
    assert m["split"] == "external" and m["n_patients"] == n_patients == 12
    assert m["n_labelled_patients"] == m["zero_shot"]["patient"]["n"] == n_in_classes
    assert m["external"]["data_dir"] == str(validated.hospital) and m["external"]["n_patients"] == 12
    assert m["external"]["labels"]["sources"]["given"] == 12
    for block in ("mean_logprob", "ot_uniform", "ot_train_prior"):
        assert m["zero_shot"]["prior_corrected"][block]["n"] == n_in_classes
    # retrieval among the external patients, not the run's own
    assert m["retrieval"]["report_to_patient"]["n_items"] == 12
    assert m["retrieval"]["report_to_image"]["n_items"] == m["n_images"] == m["external"]["n_images"]
    assert m["by_scale"]["bins"] and sum(b["n_images"] for b in m["by_scale"]["bins"]) == m["n_images"]
    assert m["classes"] == validated.internal["classes"]       # the run's own prompts, whatever the cohort holds
    from test_evaluate import check_metrics_schema
    check_metrics_schema(m)
    folder = validated.run / external_folder(validated.hospital)
    assert folder.name == "eval-external-hospital_b" and (folder / "metrics.json").is_file()


@pytest.mark.slow
def test_methods_that_learn_see_the_runs_own_patients_only(validated):
    m, cfg = validated.external, _run_config(validated.run)
    own = load_cohort(validated.cohort, labels=cfg.label_options()).reports
    in_classes = own.diagnosis.isin(m["classes"])
    n_train, n_val = (int((in_classes & (own.split == s)).sum()) for s in ("train", "val"))
    probe = m["linear_probe"]
    assert (probe["n_train"], probe["n_val"], probe["n_test"]) == (n_train, n_val, m["n_labelled_patients"])
    assert set(probe["n_excluded"]) == {"train", "val", "external"}
    mil = m["bounds"]["supervised_mil"]
    assert (mil["n_train"], mil["n_val"], mil["n_test"]) == (n_train, n_val, m["n_labelled_patients"])
    assert max(r["n_train"] for b in m["bounds"]["few_shot_probe"]["shots"].values() for r in b["per_seed"]) <= n_train


@pytest.mark.slow
def test_the_supervised_bound_reads_each_cohorts_own_features(validated, monkeypatch):
    """Trained on the run's patients' cached features, applied to the external patients' own (not those of the
    run's patient with the same id)."""
    from emclip.evaluation import external as external_module
    from emclip.evaluation.runs import load_run_model
    from emclip.train.cache import build_feature_cache, feature_cache_key
    from emclip.train.runinfo import load_run_cohort
    model, cfg = load_run_model(validated.run, device="cpu")
    cohort = load_run_cohort(cfg)
    hospital = external_module.load_external_cohort(validated.hospital, cfg, model)
    combined = combine_for_external(Embeddings.load(validated.run / "embeddings.npz"),
                                    Embeddings.load(validated.run / external_folder(validated.hospital) /
                                                    "embeddings.npz"))
    seen = {}
    monkeypatch.setattr(external_module, "stored_bound", lambda cfg, identity, compute: compute())
    monkeypatch.setattr(external_module.bounds, "supervised_mil",
                        lambda feats, scales, y, split, *a, **k: seen.update(feats=feats, scales=scales, split=split))
    external_module.external_supervised_bound(model, cfg, cohort, feature_cache_key(model, cohort), hospital,
                                              combined, validated.external["classes"])
    caches = {"external": (build_feature_cache(model, hospital.cohort, cfg.cache_path), hospital.cohort),
              "train": (build_feature_cache(model, cohort, cfg.cache_path), cohort)}
    caches["val"] = caches["train"]
    for i, (pid, split) in enumerate(zip(combined.original_ids, seen["split"])):
        cache, source = caches[split]
        rows = source.bag(pid).index.to_numpy()
        np.testing.assert_array_equal(seen["feats"][i], cache.features[rows])
        np.testing.assert_allclose(seen["scales"][i], source.images.nm_per_pixel.to_numpy()[rows] * cache.zoom[rows])
    assert seen["split"].tolist().count("external") == 12


@pytest.mark.slow
def test_colliding_patient_ids_keep_each_cohorts_own_patient(validated):
    internal_ids = set(pd.read_csv(validated.cohort / "reports.csv").patient_id)
    external_ids = pd.read_csv(validated.hospital / "reports.csv").patient_id.tolist()
    assert "P00001" in internal_ids and "P00001" in external_ids        # the collision is real
    folder = validated.run / external_folder(validated.hospital)
    predictions = pd.read_csv(folder / "predictions.csv")
    assert sorted(predictions.patient_id) == sorted(external_ids)       # ids unchanged, no internal patient
    emb = Embeddings.load(folder / "embeddings.npz")
    assert sorted(emb.patient_ids.tolist()) == sorted(external_ids)
    own_images = pd.read_csv(validated.hospital / "images.csv")
    for pid in ("P00001", "P00002"):     # each scored patient's images are that cohort's patient's, and all of them
        row = emb.patient_ids.tolist().index(pid)
        got = sorted(Path(p).resolve() for p in emb.image_paths[emb.image_patient == row])
        want = sorted((validated.hospital / p).resolve() for p in own_images.path[own_images.patient_id == pid])
        assert got == want


@pytest.mark.slow
def test_the_internal_evaluation_is_untouched_and_both_are_reused(validated):
    run = validated.run
    assert (_snapshot(run / "eval") | {"embeddings.npz": _snapshot(run)["embeddings.npz"]}) == validated.internal_files
    logs = []
    again = evaluate_run(run, n_boot=CI.bootstrap, topj=CI.topj, data_dir=validated.hospital, log=logs.append)
    internal = evaluate_run(run, n_boot=CI.bootstrap, topj=CI.topj, log=logs.append)
    assert [line.split(":")[0] for line in logs] == [
        f"reusing {run / 'eval-external-hospital_b' / 'metrics.json'}", f"reusing {run / 'eval' / 'metrics.json'}"]
    assert again == validated.external and internal == validated.internal
    assert "external" not in internal and "external" not in internal["evaluation_key"]["parts"]


@pytest.mark.slow
def test_nothing_is_written_into_the_external_cohort(validated):
    assert _snapshot(validated.hospital) == validated.before


@pytest.mark.slow
def test_diagnoses_missing_from_the_cohort_come_from_the_runs_labeler(validated, tmp_path):
    hospital = generate_cohort(tmp_path / "archive", n_patients=12, seed=12, image_size=48, workers=1,
                               progress=False, with_diagnosis=False)
    before = _snapshot(hospital)
    m = evaluate_run(validated.run, n_boot=20, topj=CI.topj, data_dir=hospital, figures=False, log=print)
    n_patients, n_in_classes = _classes_of(m, hospital, _run_config(validated.run))
    sources = m["external"]["labels"]["sources"]
    assert m["n_patients"] == n_patients == 12 and sources["given"] == 0 and sources["labeler"] >= 6
    assert m["external"]["labels"]["labeler"] == "report labeler (renal)"
    assert m["zero_shot"]["patient"]["n"] == n_in_classes == sources["labeler"] - m["labels"][
        "n_diagnosis_not_in_classes"]
    assert _snapshot(hospital) == before          # the labels cache lives in the run's cache_dir


@pytest.mark.slow
def test_a_changed_external_cohort_is_evaluated_again(validated, tmp_path):
    hospital = Path(shutil.copytree(validated.hospital, tmp_path / "hospital_c"))
    first = evaluate_run(validated.run, n_boot=20, topj=CI.topj, data_dir=hospital, figures=False, log=print)
    reports = pd.read_csv(hospital / "reports.csv")
    reports.loc[0, "diagnosis"] = "a disease the run has no prompt for"
    reports.to_csv(hospital / "reports.csv", index=False)
    logs = []
    second = evaluate_run(validated.run, n_boot=20, topj=CI.topj, data_dir=hospital, figures=False, log=logs.append)
    assert logs == [f"recomputing {validated.run / 'eval-external-hospital_c' / 'metrics.json'}: "
                    f"external.reports changed {first['evaluation_key']['parts']['external']['reports']!r} -> "
                    f"{second['evaluation_key']['parts']['external']['reports']!r}"]
    # the out-of-class diagnosis is counted as excluded, every patient is still embedded and retrieved
    assert second["n_patients"] == first["n_patients"] == 12
    assert second["zero_shot"]["patient"]["n"] == first["zero_shot"]["patient"]["n"] - 1
    assert second["zero_shot"]["patient"]["n_excluded"]["diagnosis_not_in_classes"] == 1
    assert second["zero_shot"]["diagnoses_not_in_classes"] == ["a disease the run has no prompt for"]
    assert second["retrieval"]["report_to_patient"]["n_items"] == 12


@pytest.mark.slow
def test_bad_requests_are_refused_before_anything_is_written(validated, tmp_path):
    before = _snapshot(validated.run)
    with pytest.raises(ValueError, match="is the run's own cohort"):
        evaluate_run(validated.run, data_dir=validated.cohort)
    with pytest.raises(ValueError, match="leave split at 'test'"):
        evaluate_run(validated.run, split="val", data_dir=validated.hospital)
    with pytest.raises(ValueError, match="is inside the external cohort"):
        evaluate_run(validated.run, data_dir=validated.hospital, out=validated.hospital / "report")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_run(validated.run, data_dir=tmp_path / "nowhere")
    assert _snapshot(validated.run) == before and _snapshot(validated.hospital) == validated.before


@pytest.mark.slow
def test_the_side_by_side_table_and_the_conclusion(validated):
    from emclip import summary
    internal, external = validated.internal, validated.external
    table = summary.external_table(internal, external)
    sides = ["internal test", "external: hospital_b"]
    assert list(table.columns.get_level_values(0).unique()) == sides + ["external - internal"]
    zs = ("zero-shot (prompt ensemble)", "ROC-AUC")
    for side, m in zip(sides, (internal, external)):
        block = m["zero_shot"]["patient"]["roc_auc_macro_ovr"]
        assert table.loc[zs, (side, "value")] == f"{block['value']:.3f}"
        assert table.loc[zs, (side, "95% CI")] == f"[{block['ci_low']:.3f}, {block['ci_high']:.3f}]"
        assert table.loc[zs, (side, "patients")] == str(m["zero_shot"]["patient"]["n"])
    diff = external["zero_shot"]["patient"]["roc_auc_macro_ovr"]["value"] - \
        internal["zero_shot"]["patient"]["roc_auc_macro_ovr"]["value"]
    assert table.loc[zs, ("external - internal", "")] == f"{diff:+.3f}"
    methods = table.index.get_level_values(0)
    assert {"zero-shot, prior-corrected (optimal transport to train prior)", "report -> its patient",
            "supervised gated-attention MIL on the trunk features"} <= set(methods)
    assert any(m.startswith("linear probe") for m in methods) and any("-shot linear probe" in m for m in methods)
    assert set(table.loc["report -> its patient"].index) == {"R@1", "R@10"}
    text = summary.conclusion(external, internal=internal)
    assert text.startswith("External validation") and "external cohort hospital_b" in text
    assert "On the internal test split" in text and "external" not in summary.conclusion(internal).lower()
    with pytest.raises(ValueError, match="not an external evaluation"):
        summary.external_table(internal, internal)


@pytest.mark.slow
def test_05_evaluation_takes_data_dir(validated):
    from emclip.reports import execute_notebook, report_problems
    reports = validated.root / "reports"
    # the kernel imports this checkout's emclip (another checkout's may be the one installed)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = execute_notebook("05_evaluation", reports, {"params": "ci", "run_dir": str(validated.run),
                                                      "data_dir": str(validated.hospital),
                                                      "report_dir": str(reports / "evaluation")}, env=env)
    nb = nbformat.read(str(out), as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    texts = [o.text if o.output_type == "stream" else next(
        (str(o.data[k]) for k in ("text/markdown", "text/html", "text/plain") if k in o.get("data", {})), "")
        for o in outputs]
    assert texts[0] == "## External validation on hospital_b"                       # the first thing shown
    first_table = next(t for t in texts if "<table" in t)
    assert "internal test" in first_table and "external: hospital_b" in first_table   # the table that leads
    joined = "\n".join(texts)
    assert f"reusing {validated.run / 'eval' / 'metrics.json'}" in joined          # the internal one unchanged
    assert f"reusing {validated.run / 'eval-external-hospital_b' / 'metrics.json'}" in joined
    assert "Conclusion.** External validation" in joined
    copied = json.loads((reports / "evaluation" / "eval-external-hospital_b" / "metrics.json").read_text())
    assert copied == validated.external
    assert report_problems(out.with_suffix(".html").read_text()) == []
    assert _snapshot(validated.hospital) == validated.before


# ---------------------------------------------------------------- fast: no model, hand-made embeddings


def _embeddings(ids, splits, diagnoses, seed, dim=8, images=2):
    rng = np.random.default_rng(seed)
    n = len(ids)
    return Embeddings(ids, splits, diagnoses, rng.normal(size=(n, dim)), rng.normal(size=(n, dim)),
                      rng.normal(size=(n * images, dim)), np.repeat(np.arange(n), images),
                      [f"/c{seed}/{p}_{k}.tif" for p in ids for k in range(images)], np.full(n * images, 8.0),
                      np.full(n * images, np.nan), 10.0, {"labels": {}})


def _two_cohorts(external_ids=None):
    classes = ["a", "b", "c"]
    n_int = 30
    internal = _embeddings([f"P{i:03d}" for i in range(n_int)], ["train"] * 18 + ["val"] * 6 + ["test"] * 6,
                           [classes[i % 3] for i in range(n_int)], seed=0)
    ids = external_ids or [f"P{i:03d}" for i in range(12)]
    external = _embeddings(ids, ["external"] * len(ids), [classes[(i + 1) % 3] for i in range(len(ids))], seed=1)
    return classes, internal, external


def test_combining_renames_the_runs_patients_never_the_external_ones():
    _, internal, external = _two_cohorts()
    combined = combine_for_external(internal, external)
    emb = combined.embeddings
    assert emb.patient_ids[:12].tolist() == external.patient_ids.tolist()
    assert emb.patient_ids[12:].tolist() == [INTERNAL_PREFIX + p for p in internal.patient_ids[:24]]   # no test
    assert combined.original_ids.tolist() == external.patient_ids.tolist() + internal.patient_ids[:24].tolist()
    assert emb.split.tolist() == ["external"] * 12 + ["train"] * 18 + ["val"] * 6
    np.testing.assert_array_equal(emb.patient[12:], internal.patient[:24])
    np.testing.assert_array_equal(emb.image[emb.image_patient == 12], internal.image[internal.image_patient == 0])
    # an external id that looks like a renamed one: the prefix moves aside
    _, internal, external = _two_cohorts([INTERNAL_PREFIX + "P000", "P001", "P002"])
    combined = combine_for_external(internal, external)
    assert combined.prefix == "_" + INTERNAL_PREFIX and len(set(combined.embeddings.patient_ids)) == 27
    assert combined.embeddings.patient_ids[:3].tolist() == [INTERNAL_PREFIX + "P000", "P001", "P002"]


def test_no_external_label_reaches_a_fit(monkeypatch, tmp_path):
    classes, internal, external = _two_cohorts()
    seen = {}

    def spy(name, real):
        def wrapped(*args, **kwargs):
            seen[name] = args
            return real(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(report_module, "linear_probe", spy("probe", report_module.linear_probe))
    monkeypatch.setattr(report_module, "few_shot_probe", spy("few", report_module.few_shot_probe))
    combined = combine_for_external(internal, external).embeddings

    def run(emb, out):
        return evaluate(emb, None, None, tmp_path / out, classes=classes, split="external", n_boot=10,
                        figures=False, probe_seeds=(0, 1), shots=(1, 4))
    first = run(combined, "a")
    x_tr, y_tr, x_va, y_va, x_te, y_te = seen["probe"]
    index = {c: i for i, c in enumerate(classes)}
    np.testing.assert_array_equal(x_tr, internal.patient[:18])
    np.testing.assert_array_equal(y_tr, [index[d] for d in internal.diagnosis[:18]])
    np.testing.assert_array_equal(x_va, internal.patient[18:24])
    np.testing.assert_array_equal(x_te, external.patient)
    np.testing.assert_array_equal(seen["few"][0], internal.patient[:18])
    # the external labels permuted: what was fitted (C chosen on the run's val) is the same
    shuffled = combine_for_external(internal, external).embeddings
    shuffled.diagnosis[:12] = np.random.default_rng(5).permutation(shuffled.diagnosis[:12])
    second = run(shuffled, "b")
    assert [r["C"] for r in first["linear_probe"]["per_seed"]] == [r["C"] for r in second["linear_probe"]["per_seed"]]
    assert [r["val_log_loss"] for r in first["linear_probe"]["per_seed"]] == \
        [r["val_log_loss"] for r in second["linear_probe"]["per_seed"]]
    np.testing.assert_array_equal(seen["probe"][0], x_tr)


def test_the_external_cohort_is_a_part_of_the_evaluation_key(tmp_path):
    ckpt = tmp_path / "checkpoints" / "best"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "checksums": {"model.safetensors": "aa" * 32}}))

    def cohort(dx, split="test", report="normal kidney"):
        img = tmp_path / "img.png"
        img.write_bytes(b"x")
        return SimpleNamespace(
            reports=pd.DataFrame({"patient_id": ["P0"], "split": [split], "diagnosis": [dx],
                                  "diagnosis_source": ["given"], "report": [report]}),
            images=pd.DataFrame({"patient_id": ["P0"], "path": [str(img)], "nm_per_pixel": [2.0]}), labels={})
    own = cohort("normal")

    def key(external):
        return evaluation_key(ckpt, TrainConfig(), own, "external", 10, (1, 3), False, "f1", external)
    base = key(ExternalCohort(tmp_path / "b", cohort("normal"), "f2"))
    assert set(base["parts"]["external"]) == {"data_dir", "reports", "images", "labels", "feature_cache"}
    assert key(ExternalCohort(tmp_path / "b", cohort("normal", split="train"), "f2")) == base   # its split: ignored
    for changed, part in ((ExternalCohort(tmp_path / "c", cohort("normal"), "f2"), "external.data_dir"),
                          (ExternalCohort(tmp_path / "b", cohort("amyloidosis"), "f2"), "external.reports"),
                          (ExternalCohort(tmp_path / "b", cohort("normal"), "f3"), "external.feature_cache")):
        assert [c.split(" ")[0] for c in key_changes(base, key(changed))] == [part]
    plain = evaluation_key(ckpt, TrainConfig(), own, "test", 10, (1, 3), False, "f1")
    assert "external" not in plain["parts"]
