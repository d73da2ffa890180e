"""Notebook hygiene (issue 14): one project kernel by name everywhere, and notebooks committed without outputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from emclip.reports import PROJECT_KERNEL, project_kernel

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_asks_for_the_project_kernel(path):
    spec = json.loads(path.read_text())["metadata"]["kernelspec"]
    assert spec["name"] == PROJECT_KERNEL and spec["display_name"] == "Python (emclip)"


def _committed(path: Path) -> dict | None:
    """The notebook as git holds it (the index: what a commit would contain), or None outside a git checkout."""
    out = subprocess.run(["git", "show", f":{path.relative_to(REPO)}"], cwd=REPO, capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    nb = _committed(path)
    if nb is None:
        pytest.skip("not a git checkout")
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        f"{path.name} is committed with outputs: run `make install` (it registers the nbstripout filter)"


def test_the_project_kernel_is_registered_for_this_environment():
    assert project_kernel() == PROJECT_KERNEL    # `make install` registers it (make test installs first)


def test_a_missing_or_foreign_project_kernel_is_a_clear_error(monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    def missing(self, name):
        raise NoSuchKernel(name)
    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", missing)
    with pytest.raises(RuntimeError, match="kernel 'emclip' is not registered: run `make install`"):
        project_kernel()
    foreign = SimpleNamespace(argv=["/elsewhere/bin/python", "-m", "ipykernel_launcher"], resource_dir="/x/emclip")
    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", lambda self, name: foreign)
    with pytest.raises(RuntimeError, match=r"runs /elsewhere/bin/python, not this environment's " +
                                           sys.executable.replace("/", r"\/").replace(".", r"\.")):
        project_kernel()


def _papermill(tmp_path, *args) -> subprocess.CompletedProcess:
    """papermill as typed in a shell, from inside notebooks/."""
    cmd = [sys.executable, "-m", "papermill", "03_train.ipynb", str(tmp_path / "out.ipynb"), "--no-progress-bar",
           *args]
    return subprocess.run(cmd, cwd=REPO / "notebooks", capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "EMCLIP_PARAMS": "ci"})


def test_papermill_parameters_the_notebook_does_not_have_are_refused(tmp_path):
    out = _papermill(tmp_path, "-p", "scale_embedd", "false")          # a typo of scale_embed
    assert out.returncode != 0
    assert "03_train has no parameter 'scale_embedd'; its parameters are: aggregator, batch_size" in out.stderr


def test_papermill_dash_f_with_a_parameter_set_says_how_to_name_it(tmp_path):
    out = _papermill(tmp_path, "-f", str(REPO / "params" / "ci.yaml"))
    assert out.returncode != 0
    assert ("these are the sections of a parameter set file, which papermill's -f injects as variables. Name the "
            "set instead: `-p params ci`") in out.stderr


def test_every_notebook_checks_its_parameters_first():
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        first = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
        assert f'pipeline.check_parameters(globals(), "{path.stem}")' in "".join(cells[first + 1]["source"]), path


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_line_of_the_parameters_cell(notebook):
    """papermill skips a parameter it cannot parse (an '=' in its comment is enough), and that parameter is then
    refused when given: every assignment in the cell must be one papermill knows."""
    import re
    import nbformat
    from emclip.notebook_params import declared_parameters
    nb = nbformat.read(notebook, 4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = re.findall(r"^(\w+)\s*=", cell.source, flags=re.M)
    assert assigned == declared_parameters(notebook.stem)
