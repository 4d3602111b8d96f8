# `make test`: create .venv if missing, install align_jax with its test and cpu extras, run the suite.
# `make demo`: same environment, run the main job on the embedded demo data.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.align_jax-installed

.PHONY: test demo lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,cpu]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check align_jax tests benchmarks configs
	$(VENV)/bin/ruff format --check align_jax tests benchmarks configs

# The demo trains the tiny model on the embedded demo data (generated into the workdir) and
# prints the held-out retrieval recall; rerunning resumes (or just re-evaluates when finished).
DEMO_WORKDIR ?= workdirs/demo

demo: $(STAMP)
	$(PY) -m align_jax.train --config configs/demo.py --workdir $(DEMO_WORKDIR)

clean:
	rm -rf $(VENV) build *.egg-info
