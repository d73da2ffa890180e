"""What the numbered notebooks import, in one place: ``from emclip import pipeline``.

Only re-exports, no logic: each name lives in the module that does its one job (listed below), where the package's
own code and the tests import it from; the names the former ``pipeline.py`` defined stay importable from here, and
``python -m emclip.pipeline`` is an alias of ``python -m emclip.run_notebooks``.

* parameter sets: ``emclip.paramsets``; notebook parameter check: ``emclip.notebook_params``
* a trained run's checkpoint, model, embeddings: ``emclip.evaluation.runs``
* its evaluation, reused while nothing it depends on changed: ``emclip.evaluation.cached``; on another cohort:
  ``emclip.evaluation.external``
* training curves from ``metrics_log.csv``: ``emclip.train.curves``
* report tables and sentences: ``emclip.summary``; executing notebooks and HTML: ``emclip.reports``
* running 01 -> 06 in order: ``emclip.run_notebooks``
"""
from pathlib import Path  # noqa: F401 - notebooks build their report folder with pipeline.Path

from .evaluation.cached import evaluate_run, evaluation_key, key_changes  # noqa: F401
from .evaluation.external import external_folder  # noqa: F401
from .evaluation.runs import embed_run, load_run_model, run_checkpoint, supervised_bound  # noqa: F401
from .notebook_params import check_parameters  # noqa: F401
from .paramsets import DEFAULT_PARAMS, load_params, params_name, report_dir, train_config  # noqa: F401
from .paths import resolve  # noqa: F401
from .reports import execute_notebook  # noqa: F401
from .run_notebooks import NOTEBOOKS, run_all  # noqa: F401
from .summary import label_sentence, pair_table  # noqa: F401
from .train.curves import read_log, training_curves  # noqa: F401

if __name__ == "__main__":
    from .run_notebooks import main
    raise SystemExit(main())
