# Everything runs in a project-local virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# pytest's exit code 5 (no tests collected) must fail, never pass.
PYTEST_ARGS ?=

.PHONY: install install-serve test lint demo train benchmark clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Training + serving + test tools. torch is pinned to the CPU wheel (torch==2.13.0).
install: $(PY)
	$(PIP) install --quiet -e '.[train,dev]'

# Serving only: no torch (what the service image installs).
install-serve: $(PY)
	$(PIP) install --quiet -e .

test: install
	$(PY) -m ruff check trainer service tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check trainer service tests benchmarks

# The main job on a fresh machine: install, train on the embedded dataset, print metrics.
demo: install
	$(PY) -m trainer train --dataset movielens-small --backbone comirec-sa --seed 0 --out runs/demo

benchmark: install
	$(PY) benchmarks/backbones.py --seeds 5 --out benchmarks/results

clean:
	rm -rf runs .pytest_cache .ruff_cache
