"""Notebooks as users run them: papermill from inside notebooks/, and the pipeline on a non-renal cohort."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _papermill(notebook: str, out: Path, *params: str) -> subprocess.CompletedProcess:
    """``papermill NOTEBOOK OUT -p k v ...`` exactly as typed in a shell, from inside notebooks/."""
    args = [sys.executable, "-m", "papermill", notebook, str(out), "--no-progress-bar"]
    for p in params:
        args += ["-p", *p.split("=", 1)]
    env = dict(os.environ, EMCLIP_PARAMS="ci")
    return subprocess.run(args, cwd=REPO / "notebooks", capture_output=True, text=True, timeout=900, env=env)


def test_03_train_as_typed_with_string_false(tmp_path, tiny_cohort):
    run = tmp_path / "run"
    out = _papermill("03_train.ipynb", tmp_path / "out.ipynb", "scale_embed=false", "scale_mode=mlp", "epochs=1",
                     f"data_dir={tiny_cohort}", f"run_dir={run}", "n_boot=50", "batch_size=4")
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["scale_embed"] is False and config["epochs"] == 1      # "false" on the command line is False
    scale = json.loads((run / "run_info.json").read_text())["model_config"]["scale"]
    assert scale["enabled"] is False and scale["mode"] == "mlp" and config["scale_mode"] == "mlp"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    auc = metrics["zero_shot"]["patient"]["roc_auc_macro_ovr"]
    assert 0 <= auc["value"] <= 1 and auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    assert metrics["split"] == "test" and metrics["n_patients"] == 3
    assert (run / "training_curves.png").is_file() and (run / "eval" / "roc.png").is_file()


def _user_cohort(root: Path) -> Path:
    """A non-renal cohort: RGB PNGs and grayscale JPEGs of different sizes, diagnoses the prompts do not know."""
    rng = np.random.default_rng(0)
    images, reports = [], []
    for i in range(24):
        pid, dx = f"case{i:02d}", ["granular pattern", "striped pattern", "smooth pattern"][i % 3]
        (root / pid).mkdir(parents=True)
        for k in range(1 + i % 4):
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            base = rng.random((h, w))
            if dx == "striped pattern":
                base = 0.5 + 0.5 * np.sin(np.arange(w) / 3)[None, :] * np.ones((h, 1))
            arr = (base * 255).astype(np.uint8)
            if k % 2:
                path = f"{pid}/img{k}.png"
                Image.fromarray(np.stack([arr, arr, arr // 2], -1)).save(root / path)
            else:
                path = f"{pid}/img{k}.jpg"
                Image.fromarray(arr).save(root / path)
            images.append({"patient_id": pid, "path": path, "nm_per_pixel": float(rng.uniform(2, 100))})
        reports.append({"patient_id": pid, "report": f"The sample shows a {dx}.", "diagnosis": dx})
    pd.DataFrame(images).to_csv(root / "images.csv", index=False)
    pd.DataFrame(reports).to_csv(root / "reports.csv", index=False)
    return root


def test_pipeline_on_a_users_cohort_with_other_diagnoses(tmp_path):
    cohort = _user_cohort(tmp_path / "cohort")
    check = subprocess.run([sys.executable, "-m", "emclip.data", "check", str(cohort)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    run = tmp_path / "run"
    out = _papermill("03_train.ipynb", tmp_path / "out.ipynb", f"data_dir={cohort}", f"run_dir={run}", "epochs=2",
                     "batch_size=4", "n_boot=50")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["classes"] == ["granular pattern", "smooth pattern", "striped pattern"]
    assert metrics["n_patients"] > 0 and metrics["zero_shot"]["patient"]["n"] == metrics["n_patients"]


@pytest.mark.parametrize("notebook", sorted(p.name for p in (REPO / "notebooks").glob("[0-9]*.ipynb")))
def test_papermill_parses_every_parameter(notebook):
    """A parameter papermill cannot parse (e.g. a comment it misreads) is injected as 'unknown' with a warning in
    every report: each assignment of the parameters cell must come back from papermill's own inspector."""
    import re

    import nbformat
    import papermill
    nb = nbformat.read(str(REPO / "notebooks" / notebook), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    assigned = set(re.findall(r"^(\w+)\s*=", cell.source, flags=re.M))
    assert assigned and set(papermill.inspect_notebook(str(REPO / "notebooks" / notebook))) == assigned


def test_a_whole_run_reads_clean_in_html_with_an_index(tmp_path):
    """01 -> 05 with the ci parameters (04 runs 03 per arm in nested kernels): no report contains a warning, a
    traceback, a kernel log line or a network script; code is hidden; index.html links every report and figure."""
    import re
    import yaml
    from emclip.reports import report_problems
    from emclip.run_notebooks import run_all
    params = yaml.safe_load((REPO / "params" / "ci.yaml").read_text())
    params["name"] = "ci-html"
    params["train"].update(run_dir=str(tmp_path / "runs" / "main"), cache_dir=str(REPO / "cache" / "ci"))
    params["evaluation"]["bootstrap"] = 50
    pfile = tmp_path / "ci-html.yaml"
    pfile.write_text(yaml.safe_dump(params))
    out = tmp_path / "reports"
    env_before = dict(os.environ)
    try:
        run_all(str(pfile), out=out, summary=False)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    pages = sorted(out.rglob("*.html"))
    assert {p.name for p in pages} >= {"01_data_audit.html", "02_features.html", "03_train.html",
                                       "04_ablations.html", "05_evaluation.html", "index.html"}
    for page in pages:
        text = page.read_text()
        assert report_problems(text) == [], (page, report_problems(text))
        assert "import json" not in text, page          # inputs hidden
    index = (out / "index.html").read_text()
    for name in ("01_data_audit.html", "05_evaluation.html", "evaluation/by_scale.png", "evaluation/roc.png"):
        assert name in index, name
    ev = (out / "05_evaluation.html").read_text()
    assert "Conclusion." in ev and "prior-corrected" in ev and re.search(r"supervised gated-attention MIL", ev)
    assert (tmp_path / "runs").is_dir() and not (REPO / "reports" / "ci-html").exists()
