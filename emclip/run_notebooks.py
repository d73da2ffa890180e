"""The numbered notebooks run in order, the way ``make demo`` runs them: ``python -m emclip.run_notebooks [PARAMS]``.

Each notebook executes with papermill into ``reports/<params>/`` (executed .ipynb, HTML, its wall time in
``timings.json``), then an ``index.html`` links them. 06 applies the trained run to the parameter set's cohort of
new patients (``inference:``). The reference parameter set also refreshes the small committed copy in
``reports/summary/`` (``SUMMARY_FILES``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .paramsets import DEFAULT_PARAMS, load_params, report_dir
from .paths import project_root
from .reports import execute_notebook, write_index
from .summary import conclusion

__all__ = ["NOTEBOOKS", "SUMMARY_FILES", "run_all", "notebook_parameters", "index_summary", "refresh_summary", "main"]

NOTEBOOKS = ("01_data_audit", "02_features", "03_train", "04_ablations", "05_evaluation", "06_inference")
REPORT_SUBFOLDERS = {"05_evaluation": "evaluation", "06_inference": "inference"}   # the others write into out

# what reports/summary/ keeps of the reference run: file in the report folder -> its name in the summary
SUMMARY_FILES = {
    **{name: name for name in ("ablation.md", "ablation.png", "timings.json", "audit_overview.png",
                               "features_pca_by_scale.png", "cohort_grid.png")},
    "metrics.json": "ablation_metrics.json",   # 04's numbers; 05's metrics.json is evaluation_metrics.json
    **{f"evaluation/{name}": f"evaluation_{name}" for name in (
        "roc.png", "confusion_matrix.png", "recall_at_k.png", "attention.png", "metrics.json", "by_scale.png",
        "attention_by_scale.png", "embedding_map.png", "prompt_similarity.png")},
}


def notebook_parameters(name: str, params: str, out: Path | None) -> dict:
    """Papermill parameters of one notebook: the parameter set, and with a custom ``out`` the report folder (03
    writes into its run folder only; 05 into ``out/evaluation`` and 06 into ``out/inference``, as they do under
    ``reports/<params>/``)."""
    parameters = {"params": params}
    if out is not None and name != "03_train":
        parameters["report_dir"] = str(out / REPORT_SUBFOLDERS[name] if name in REPORT_SUBFOLDERS else out)
    return parameters


# notebooks of one stage only read what earlier stages wrote, so they may run at the same time: 01 and 02 both read
# the cohort, 04, 05 and 06 all read 03's run (04 reuses it as one of its arms; 06 also reads its own new cohort)
STAGES = (("01_data_audit", "02_features"), ("03_train",), ("04_ablations", "05_evaluation", "06_inference"))


def _stages(notebooks, together: bool) -> list[list[str]]:
    """``notebooks`` grouped into the stages that may run at once, in order (one each without ``together``)."""
    chosen = [n for n in NOTEBOOKS if n in notebooks] + [n for n in notebooks if n not in NOTEBOOKS]
    if not together:
        return [[n] for n in chosen]
    groups = [[n for n in stage if n in chosen] for stage in STAGES] + [[n for n in chosen if n not in NOTEBOOKS]]
    return [g for g in groups if g]


def _generate_cohort(params: str, log) -> bool:
    """Generate the parameter set's demo cohort here when it does not exist yet, so that 01 and 02 can start together
    (02 would otherwise find 01 half-way through writing it). False when it cannot be generated (a folder the user
    named, or one holding something): the notebooks then run one after the other and 01 says what is wrong."""
    from .train.runinfo import _has_tables, ensure_cohort
    cfg = load_params(params).train
    if _has_tables(cfg.data_path):
        return True
    try:
        ensure_cohort(cfg, log=log)
    except (FileNotFoundError, ValueError):
        return False
    return True


def _generate_inference_cohort(params: str, log) -> None:
    """Generate the parameter set's cohort of new patients, when it is missing, before 06 runs beside 04 and 05, so
    that 06 does not render it while they compete for the same cores (alone, 06 generates it itself). When it
    cannot be (a folder holding something else, no inference.data_dir), nothing happens: 06 says what is wrong."""
    from .serving.inference import inference_cohort
    try:
        inference_cohort(load_params(params).inference, log=log)
    except (FileNotFoundError, ValueError):
        pass


def run_all(params: str = DEFAULT_PARAMS, notebooks=NOTEBOOKS, summary: bool = True, out: str | Path | None = None,
            show_code: bool = False, execute: Callable = execute_notebook, summary_dir: str | Path | None = None,
            log=print, together: bool | None = None) -> Path:
    """Execute ``notebooks`` with ``params`` into ``reports/<params>/`` (or ``out``): executed .ipynb, .html (code
    hidden unless ``show_code``), the total wall time added to ``timings.json`` and an ``index.html``.

    With ``together`` (default: on a machine with two or more cores) the notebooks of one of ``STAGES`` run at the
    same time (01 with 02, after generating the demo cohort if it is missing; 04 with 05 and 06, after generating
    the cohort of new patients if it is missing); otherwise one after another. With ``summary`` and the reference
    parameter set, ``refresh_summary`` copies the reader-facing results into ``summary_dir`` (default
    ``reports/summary/``).
    ``execute`` runs one notebook (``reports.execute_notebook``).
    """
    folder = Path(out) if out is not None else report_dir(params)
    name = load_params(params).name
    together = (os.cpu_count() or 1) >= 2 if together is None else together
    start = time.perf_counter()

    def one(notebook: str) -> None:
        t0 = time.perf_counter()
        log(f"[{time.perf_counter() - start:6.0f} s] executing {notebook} ...")
        execute(notebook, folder, notebook_parameters(notebook, params, None if out is None else folder),
                show_code=show_code)
        log(f"[{time.perf_counter() - start:6.0f} s] {notebook} done in {time.perf_counter() - t0:.0f} s")

    stages = _stages(notebooks, together)
    if stages and stages[0] == list(STAGES[0]) and not _generate_cohort(params, log):
        stages[:1] = [[STAGES[0][0]], [STAGES[0][1]]]
    for stage in stages:
        if "06_inference" in stage and len(stage) > 1:
            _generate_inference_cohort(params, log)
        if len(stage) == 1:
            one(stage[0])
            continue
        with ThreadPoolExecutor(len(stage)) as pool:
            futures = [pool.submit(one, n) for n in stage]
            errors = [f.exception() for f in futures]
        failed = [e for e in errors if e is not None]
        if failed:
            raise failed[0]
    total = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    timings_path = folder / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    timings["total"] = round(total, 1)
    timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    if summary and name == DEFAULT_PARAMS:
        refresh_summary(folder, summary_dir)
    write_index(folder, f"emclip · {name} run", index_summary(folder))
    log(f"all notebooks done in {total:.0f} s; reports in {folder} (open {folder / 'index.html'})")
    return folder


def index_summary(out: Path) -> str:
    """The headline of a run for its index page: the evaluation's conclusion sentence, if there is one."""
    path = Path(out) / "evaluation" / "metrics.json"
    if not path.exists():
        return ""
    return f"<p>{conclusion(json.loads(path.read_text()), html=True)}</p>"


def refresh_summary(out: str | Path, dest: str | Path | None = None) -> list[Path]:
    """Copy the ``SUMMARY_FILES`` present in ``out`` into ``dest`` (default: the committed ``reports/summary/``);
    returns the files written."""
    out, dest = Path(out), Path(dest) if dest is not None else project_root() / "reports" / "summary"
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for source, target in SUMMARY_FILES.items():
        if (out / source).exists():
            written.append(Path(shutil.copy2(out / source, dest / target)))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emclip.run_notebooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("params", nargs="?", default=DEFAULT_PARAMS,
                        help=f"parameter set: a name in params/ or a YAML path (default {DEFAULT_PARAMS})")
    parser.add_argument("--out", help="report folder (default reports/<params>/)")
    parser.add_argument("--show-code", action="store_true", help="keep the code cells in the HTML reports")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="never run two notebooks at once (default: 01 with 02, and 04 with 05 and 06, on >= 2 "
                             "cores)")
    args = parser.parse_args(argv)
    run_all(args.params, out=args.out, show_code=args.show_code, log=lambda line: print(line, flush=True),
            together=False if args.one_at_a_time else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
