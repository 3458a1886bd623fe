# dbgov — developer entry points. Every target installs what it needs on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast test-unit lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py sidecar/dbgov_sidecar/_lane.pyx
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,fast,operator]'
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check sidecar operator tests bench
	$(VENV)/bin/ruff format --check sidecar operator tests bench
	$(VENV)/bin/mypy

# The full suite CI runs: lint, unit, integration (real PostgreSQL), e2e (real kube-apiserver).
test: setup lint tools node-deps
	$(PY) -m pytest -n 2 tests

# Fast loop while iterating: unit tests only.
test-unit: setup
	$(PY) -m pytest -n 2 tests/unit

# kube-apiserver, etcd, kube-controller-manager, kubelet, pause and helm for the e2e tests, built from
# the Go modules pinned in
# hack/tools/ into ~/.cache/dbgov/tools (override: DBGOV_TOOLS_DIR); cached per version.
.PHONY: tools node-deps crds e2e kind-e2e
tools:
	hack/build-tools.sh

# containerd, runc, the CNI plugins and debootstrap from Debian's packages, for the e2e node that
# runs real pods (tests/e2e/node.py); installs only what is missing (needs root, as CI runs).
node-deps:
	hack/install-node-deps.sh

# e2e tests only: a real etcd + kube-apiserver started by the test session.
e2e: setup tools node-deps
	$(PY) -m pytest -n 2 tests/e2e

# Copy the canonical CRDs (crds/) into the chart; tests/unit/test_chart.py fails if they differ.
crds:
	cp crds/*.yaml charts/dbgov/files/crds/

# Install the chart on a kind cluster (needs Docker, kind, kubectl; not part of `make test`).
kind-e2e: tools
	hack/kind-e2e.sh

demo: setup
	$(PY) -m dbgov_sidecar.demo

# Policy decisions (µs, first sight vs cached), then pgbench through direct / pgbouncer / dbgov,
# then pgbench -S at 1 to 1,000 clients through pgbouncer / dbgov (tps, p99, RSS, CPU, audit).
bench: setup
	$(PY) bench/decisions.py
	$(PY) bench/run.py
	$(PY) bench/sweep.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
