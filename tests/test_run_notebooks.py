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
        if name == "05_evaluation":
            for f in files:
                (folder / f).parent.mkdir(parents=True, exist_ok=True)
                if not (folder / f).exists():
                    (folder / f).write_text(json.dumps({"split": "test", "zero_shot": {}}) if f.endswith(".json")
                                            else f"content of {f}")
    return execute


def test_notebooks_run_in_order_with_their_report_folders(tmp_path):
    calls, out = [], tmp_path / "report"
    assert run_all("ci", out=out, execute=fake_execute(calls), log=lambda *_: None, together=False) == out
    assert [c[0] for c in calls] == list(NOTEBOOKS) == ["01_data_audit", "02_features", "03_train",
                                                        "04_ablations", "05_evaluation", "06_inference"]
    assert all(folder == out for _, folder, _ in calls)
    params = {name: p for name, _, p in calls}
    assert params["03_train"] == {"params": "ci"}                    # 03 writes into its run folder only
    assert params["05_evaluation"] == {"params": "ci", "report_dir": str(out / "evaluation")}
    assert params["06_inference"] == {"params": "ci", "report_dir": str(out / "inference")}
    assert params["01_data_audit"] == params["04_ablations"] == {"params": "ci", "report_dir": str(out)}
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == set(NOTEBOOKS) | {"total"} and timings["total"] >= 0
    index = (out / "index.html").read_text()
    assert "ci run" in index and "Total wall time" in index


def test_stages_run_together_and_never_before_what_they_read(tmp_path, monkeypatch):
    """01 with 02, and 04 with 05 and 06, at the same time; 03 only after 02, 04 to 06 only after 03. A cohort not
    yet generated is generated before 01 and 02 start; the cohort of new patients before 04 to 06 start."""
    import threading
    import time
    spans, lock = {}, threading.Lock()

    def execute(name, folder, parameters, show_code=False):
        t0 = time.perf_counter()
        time.sleep(0.3)
        with lock:
            spans[name] = (t0, time.perf_counter())

    def overlap(a, b):
        return spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]

    def before(a, b):
        return spans[a][1] <= spans[b][0]

    generated = []
    monkeypatch.setattr(run_notebooks, "_generate_cohort", lambda params, log: generated.append(params) or True)

    def new_cohort(params, log):
        with lock:
            spans["new cohort"] = (time.perf_counter(), time.perf_counter())
    monkeypatch.setattr(run_notebooks, "_generate_inference_cohort", new_cohort)
    run_all("ci", out=tmp_path / "a", execute=execute, log=lambda *_: None, summary=False, together=True)
    assert generated == ["ci"]                                     # before 01 and 02 start
    assert overlap("01_data_audit", "02_features") and overlap("04_ablations", "05_evaluation")
    assert overlap("04_ablations", "06_inference") and overlap("05_evaluation", "06_inference")
    assert before("02_features", "03_train") and before("03_train", "04_ablations")
    assert before("03_train", "05_evaluation") and before("03_train", "06_inference")
    assert before("03_train", "new cohort") and before("new cohort", "06_inference")
    monkeypatch.setattr(run_notebooks, "_generate_cohort", lambda params, log: False)   # cannot be generated
    spans.clear()
    run_all("ci", out=tmp_path / "b", execute=execute, log=lambda *_: None, summary=False, together=True)
    assert before("01_data_audit", "02_features")
    spans.clear()
    run_all("ci", out=tmp_path / "c", execute=execute, log=lambda *_: None, summary=False, together=False)
    names = sorted(spans, key=lambda n: spans[n][0])
    assert all(before(a, b) for a, b in zip(names, names[1:]))


def test_a_failing_notebook_stops_the_chain_after_its_stage_partner_finishes(tmp_path):
    ran = []

    def execute(name, folder, parameters, show_code=False):
        ran.append(name)
        if name == "04_ablations":
            raise RuntimeError("arm failed")

    with pytest.raises(RuntimeError, match="arm failed"):
        run_all("ci", notebooks=("04_ablations", "05_evaluation"), out=tmp_path, execute=execute,
                log=lambda *_: None, summary=False, together=True)
    assert sorted(ran) == ["04_ablations", "05_evaluation"]


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
    run_all(params, out=out, execute=fake_execute([], PRODUCED), summary_dir=dest, log=lambda *_: None,
            together=False)
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


def test_the_cohort_is_generated_before_the_first_stage_only_when_it_can_be(monkeypatch):
    from emclip.train import runinfo
    calls = []
    monkeypatch.setattr(runinfo, "_has_tables", lambda path: True)
    monkeypatch.setattr(runinfo, "ensure_cohort", lambda cfg, log=print: calls.append(cfg))
    assert run_notebooks._generate_cohort("ci", print) and calls == []          # already there: nothing to do
    monkeypatch.setattr(runinfo, "_has_tables", lambda path: False)
    assert run_notebooks._generate_cohort("ci", print) and len(calls) == 1       # generated here
    def refuse(cfg, log=print):
        raise FileNotFoundError("data_dir x has no cohort tables")
    monkeypatch.setattr(runinfo, "ensure_cohort", refuse)
    assert not run_notebooks._generate_cohort("ci", print)                      # the notebooks will say why


def test_executing_a_notebook_never_changes_this_process_working_directory(tmp_path, monkeypatch):
    """papermill's cwd= chdirs the whole process while a notebook runs; with notebooks run from threads at once the
    process was left in notebooks/ (relative paths of later code broke). The kernel gets the folder instead."""
    import os
    import papermill
    from emclip import reports
    seen = {}

    def fake_execute(source, out, parameters, cwd, progress_bar, kernel_name, kernel_manager_class):
        seen.update(cwd=cwd, manager=kernel_manager_class, during=os.getcwd())
        open(out, "w").write("{}")

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    monkeypatch.setattr(reports, "project_kernel", lambda: "emclip")
    before = os.getcwd()
    reports.execute_notebook("03_train", tmp_path, {"params": "ci"}, html_copy=False)
    assert seen["cwd"] is None and seen["during"] == before == os.getcwd()
    assert seen["manager"].kernel_cwd.endswith("notebooks")
    started = {}
    monkeypatch.setattr(reports.KernelManager, "start_kernel", lambda self, **kw: started.update(kw))
    seen["manager"]().start_kernel()
    assert started["cwd"] == seen["manager"].kernel_cwd and started["env"]["TQDM_DISABLE"] == "1"


def test_the_cohort_of_new_patients_is_generated_before_06_when_it_can_be(monkeypatch):
    from emclip.paramsets import load_params
    from emclip.serving import inference
    calls = []
    monkeypatch.setattr(inference, "inference_cohort", lambda settings, log=print: calls.append(settings))
    run_notebooks._generate_inference_cohort("ci", print)
    assert calls == [load_params("ci").inference]                 # the set's own section

    def refuse(settings, log=print):
        raise FileNotFoundError("inference.data_dir x has no images.csv")
    monkeypatch.setattr(inference, "inference_cohort", refuse)
    run_notebooks._generate_inference_cohort("ci", print)          # 06 will say why; the chain goes on


def test_the_kernel_check_reads_an_interpreter_path_through_dot_dot_and_a_linked_venv(tmp_path):
    from emclip.reports import _interpreter
    venv = tmp_path / "checkout" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to("/usr/bin/env")              # a venv's python links to the shared base binary
    (tmp_path / "checkout" / "notebooks").mkdir()
    (tmp_path / "worktree").mkdir()
    (tmp_path / "worktree" / ".venv").symlink_to(tmp_path / "checkout" / ".venv")
    plain = _interpreter(str(venv / "python"))
    assert _interpreter(str(tmp_path / "checkout" / "notebooks" / ".." / ".venv" / "bin" / "python")) == plain
    assert _interpreter(str(tmp_path / "worktree" / ".venv" / "bin" / "python")) == plain
    other = tmp_path / "other" / "bin"
    other.mkdir(parents=True)
    (other / "python").symlink_to("/usr/bin/env")             # another venv on the same base: not the same
    assert _interpreter(str(other / "python")) != plain
