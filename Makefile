# emclip: the two commands a newcomer needs are `make demo` and `make test`.
# Both create (or reuse) the virtual environment in $(VENV) and install the project into it first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.emclip-installed
KERNEL := $(VENV)/share/jupyter/kernels/emclip/kernel.json
DATA ?= data/demo_cohort
# spin-waiting OpenMP threads are up to 12x slower on a busy 2-core machine (benchmarks/bench_threads.py)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: help install test test-fast demo demo-unlabelled study cohort figures lab bench bench-smoke clean

help:
	@echo "make demo     install, generate the embedded cohort and run notebooks 01-06 into reports/demo/"
	@echo "make test     install and run the test suite (pytest, notebooks 01-06 included)"
	@echo "make demo-unlabelled  the demo on the same cohort without its diagnosis column (labels from the reports)"
	@echo "make study    the scale study: 3,000 patients, every arm x 3 seeds (~1 h on 2 cores) -> reports/study/"
	@echo "make cohort   only generate the embedded cohort into $(DATA)"
	@echo "make lab      start JupyterLab with the project's kernel"
	@echo "make bench    run every benchmark (~15 min on 2 cores) -> reports/benchmarks/benchmarks.{md,json}"

# torch is pinned and installed first: an unpinned resolve would fetch a multi-GB build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# the project's Jupyter kernel, inside the environment: notebooks, papermill, the tests and `make lab` all name it
$(KERNEL): | $(STAMP)
	$(PY) -m ipykernel install --sys-prefix --name emclip --display-name "Python (emclip)"

# executed notebooks are committed without outputs (.gitattributes): the filter lives in this clone's .git/config
$(VENV)/.nbstripout: | $(STAMP)
	if git rev-parse --git-dir >/dev/null 2>&1; then $(VENV)/bin/nbstripout --install; fi
	touch $@

install: $(STAMP) $(KERNEL) $(VENV)/.nbstripout

# the pytest suite; tests/test_notebook_outputs.py executes notebooks 01-06 with the seconds-scale parameter set
# params/ci.yaml and compares what matters (figures, no warnings or errors, key numbers within tolerance)
test: install
	$(PY) -m pytest tests

test-fast: install
	$(PY) -m pytest -m "not slow and not distributed"

$(DATA)/reports.csv: | $(STAMP)
	$(PY) -m emclip.synthetic --out $(DATA) --seed 0

cohort: $(DATA)/reports.csv

figures: install cohort
	$(PY) -m emclip.data check $(DATA)
	$(PY) -m emclip.synthetic.figure --data $(DATA) --out reports/summary/cohort_grid.png

# the whole study on the embedded cohort: notebooks 01 -> 06 with params/demo.yaml into reports/demo/
demo: install
	$(PY) -m emclip.run_notebooks demo

# the demo as a real archive would run it: no diagnosis column, labels from the report labeler
demo-unlabelled: install
	test -f data/demo_cohort_unlabelled/reports.csv || $(PY) -m emclip.synthetic --out data/demo_cohort_unlabelled \
		--seed 0 --without-diagnosis
	$(PY) -m emclip.run_notebooks params/demo_unlabelled.yaml

# the decisive scale study (docs/study.md): generates data/study_cohort on first use, resumes finished arms
study: install
	$(PY) -m emclip.study study

lab: install
	cd notebooks && ../$(VENV)/bin/jupyter lab

bench: install
	$(PY) benchmarks/run_all.py

bench-smoke: install
	$(PY) benchmarks/run_all.py --smoke --out reports/benchmarks/smoke

clean:
	rm -rf $(DATA) reports/*/ .pytest_cache
