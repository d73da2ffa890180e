"""run_notebooks without papermill: a fake ``execute`` records what would run, in which order, with which
parameters, and writes what the real notebooks would, so chaining, timings, the index and the summary copy are
checked in milliseconds."""
import json

import pytest

from emclip import run_notebooks
from emclip.run_notebooks import NOTEBOOKS, SUMMARY_FILES, notebook_parameters, refresh_summary, run_all

PRODUCED = ["ablation.md", "ablation.png", "metrics.json", "timings.json", "audit_overview.png", "cohort_grid.png",
            "features_pca_by_scale.png", "audit.json", "04_ablations.html", "evaluation/roc.png",
            "evaluation/metrics.json", "evaluation/predictions.csv", "evaluation/by_scale.png"]


def fake_execute(calls, files=()):
    """An execute_notebook stand-in: records (notebook, folder, parameters), adds its timing, writes ``files``
    after 05 (the folder then looks like a finished run)."""
    def execute(name, folder, parameters, show_code=False):
        calls.append((name, folder, parameters))
        folder.mkdir(parents=True, exist_ok=True)
        timings = folder / "timings.json"
        record = json.loads(timings.read_text()) if timings.exists() else {}
        timings.write_text(json.dumps({**record, name: 1.5}))
        if name == NOTEBOOKS[-1]:
            for f in files:
                (folder / f).parent.mkdir(parents=True, exist_ok=True)
                if not (folder / f).exists():
                    (folder / f).write_text(json.dumps({"split": "test", "zero_shot": {}}) if f.endswith(".json")
                                            else f"content of {f}")
    return execute


def test_notebooks_run_in_order_with_their_report_folders(tmp_path):
    calls, out = [], tmp_path / "report"
    assert run_all("ci", out=out, execute=fake_execute(calls), log=lambda *_: None) == out
    assert [c[0] for c in calls] == list(NOTEBOOKS) == ["01_data_audit", "02_features", "03_train",
                                                        "04_ablations", "05_evaluation"]
    assert all(folder == out for _, folder, _ in calls)
    params = {name: p for name, _, p in calls}
    assert params["03_train"] == {"params": "ci"}                    # 03 writes into its run folder only
    assert params["05_evaluation"] == {"params": "ci", "report_dir": str(out / "evaluation")}
    assert params["01_data_audit"] == params["04_ablations"] == {"params": "ci", "report_dir": str(out)}
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == set(NOTEBOOKS) | {"total"} and timings["total"] >= 0
    index = (out / "index.html").read_text()
    assert "ci run" in index and "Total wall time" in index


def test_a_subset_runs_alone_and_the_index_carries_the_conclusion(tmp_path):
    calls, out = [], tmp_path / "report"
    run_all("ci", notebooks=("05_evaluation",), out=out, execute=fake_execute(calls, ["evaluation/metrics.json"]),
            log=lambda *_: None)
    assert [c[0] for c in calls] == ["05_evaluation"]
    assert "No labelled test patient could be scored" in (out / "index.html").read_text()
    assert run_notebooks.index_summary(tmp_path / "nothing") == ""


def test_without_out_the_parameter_sets_report_folder_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(run_notebooks, "report_dir", lambda params: tmp_path / "reports" / params)
    calls = []
    assert run_all("ci", notebooks=("03_train",), execute=fake_execute(calls), log=lambda *_: None) == \
        tmp_path / "reports" / "ci"
    assert calls[0][2] == {"params": "ci"}                         # no report_dir: the notebook's own default
    assert notebook_parameters("01_data_audit", "ci", None) == {"params": "ci"}


@pytest.mark.parametrize("params, copied", [("demo", True), ("ci", False)])
def test_the_summary_copy_is_the_listed_files_of_the_reference_run_only(tmp_path, params, copied):
    out, dest = tmp_path / "report", tmp_path / "summary"
    run_all(params, out=out, execute=fake_execute([], PRODUCED), summary_dir=dest, log=lambda *_: None)
    if not copied:
        assert not dest.exists()
        return
    listed = {SUMMARY_FILES[f] for f in PRODUCED if f in SUMMARY_FILES}
    assert {p.name for p in dest.iterdir()} == listed
    assert "audit.json" not in listed and "evaluation_predictions.csv" not in listed       # produced, not listed
    # the two metrics.json files keep apart: 04's as ablation_metrics.json, 05's as evaluation_metrics.json
    assert {"ablation_metrics.json", "evaluation_metrics.json"} <= listed
    assert (dest / "evaluation_roc.png").read_text() == "content of evaluation/roc.png"
    assert json.loads((dest / "timings.json").read_text())["total"] >= 0      # copied after the total is added


def test_refresh_summary_copies_what_exists_and_returns_it(tmp_path):
    (tmp_path / "run" / "evaluation").mkdir(parents=True)
    (tmp_path / "run" / "evaluation" / "attention.png").write_text("x")
    written = refresh_summary(tmp_path / "run", tmp_path / "summary")
    assert written == [tmp_path / "summary" / "evaluation_attention.png"]
