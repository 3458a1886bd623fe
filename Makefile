# dbgov — developer entry points. Every target installs what it needs on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast test-unit lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,fast,operator]'
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check sidecar operator tests bench
	$(VENV)/bin/ruff format --check sidecar operator tests bench
	$(VENV)/bin/mypy

# The full suite CI runs: lint, unit, integration (real PostgreSQL), e2e (real kube-apiserver).
test: setup lint
	$(PY) -m pytest -n 2 tests

# Fast loop while iterating: unit tests only.
test-unit: setup
	$(PY) -m pytest -n 2 tests/unit

demo: setup
	$(PY) -m dbgov_sidecar.demo

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
