# detserve: two commands for a newcomer.
#   make serve   set up .venv, prepare the default models, run the server
#   make test    set up .venv, run the test suite offline (loopback-only namespace)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.detserve-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup serve test test-slow fuzz bench bench-setup models lock clean help

help:
	@echo "make serve   - set up, prepare the default models, serve them on http://127.0.0.1:8000"
	@echo "make test    - set up and run the test suite offline"
	@echo "make test-slow - the slow tests too (training, full parity sweeps)"
	@echo "make fuzz    - the fuzz tests with 2000 examples each (make test runs 30)"
	@echo "make bench   - quick benchmark (see benchmarks/README.md)"

# Pinned, locked install. Re-runs only when the lock or pyproject changes.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

setup: $(STAMP)

# Default models: export the shipped weights (models/) into artifacts/, verified.
models: setup
	$(PY) -m detserve models

serve: models
	$(PY) -m detserve serve

# The suite runs in a network namespace with only loopback up, so nothing
# can leave the machine even by accident (scripts/offline-run says how).
test: setup
	scripts/offline-run $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	DETSERVE_FUZZ_EXAMPLES=300 scripts/offline-run $(PY) -m pytest -q $(PYTEST_ARGS)

# schemathesis against the app's spec and hypothesis over decode and the request parser, longer.
fuzz: setup
	DETSERVE_FUZZ_EXAMPLES=2000 scripts/offline-run $(PY) -m pytest -q tests/test_fuzz.py $(PYTEST_ARGS)

# PyTriton's own venv for `make bench` (needs the registry once; without it the peer is reported unavailable).
.cache/bench-pytriton/.installed: $(STAMP)
	-$(PY) -m detserve.benchmarks --setup-peers
	@test -x .cache/bench-pytriton/bin/python && touch $@ || true

bench-setup: .cache/bench-pytriton/.installed

bench: models bench-setup
	scripts/offline-run $(PY) -m detserve.benchmarks --quick

# Regenerate the lock from pyproject.toml's pins (needs the registry).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q -e ".[test,bench]"
	.lock-venv/bin/pip freeze --exclude-editable | grep -v '^detserve' > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf artifacts .cache .pytest_cache
