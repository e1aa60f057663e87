# detserve: two commands for a newcomer.
#   make serve   set up .venv, prepare the default models, run the server
#   make test    set up .venv, run the test suite offline (loopback-only namespace)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.detserve-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONUNBUFFERED := 1
# A pipe must fail when pip fails, not only when the filter does.
.SHELLFLAGS := -o pipefail -c
# pip's own progress without its noise: a pip config that names missing local mirror folders
# prints "WARNING: Location '...' is ignored" once per package (about 190 lines), and a re-run
# lists every "Requirement already satisfied". Errors and everything else still show.
PIP_QUIET_NOISE := 2>&1 | { grep --line-buffered -v -E "^WARNING: Location '.*' is ignored|^Requirement already satisfied" || true; }

.PHONY: setup serve test test-slow fuzz bench bench-overload bench-setup soak models lock clean help gpu-check

help:
	@echo "make serve   - set up, prepare the default models, serve them on http://127.0.0.1:8000 (SERVE_ARGS='--port 8001')"
	@echo "make test    - set up and run the test suite offline"
	@echo "make test-slow - the slow tests too (training, full parity sweeps)"
	@echo "make fuzz    - the fuzz tests with 2000 examples each (make test runs 30)"
	@echo "make bench   - quick benchmark (see benchmarks/README.md)"
	@echo "make bench-overload - detserve under overload: burst, open loop at 2x peak, large+small mixed (BENCH_ARGS='--overload-seconds 30')"
	@echo "make soak    - 10 minutes of mixed load at 70% of capacity; fails on an unexpected answer, RSS or fd growth (SOAK_ARGS='--seconds 120')"

# Pinned, locked install. Re-runs only when the lock or pyproject changes.
# uv installs the lock (from the registry) in about 50 s where pip took about 130 s on
# CI's 2 cores: that alone is most of `make test`'s budget on a fresh clone. pip only
# bootstraps uv itself (pinned); uv does not read pip's config, so the lock's exact pins
# are what it installs. --compile-bytecode as pip does: with PYTHONDONTWRITEBYTECODE set (as on
# these machines) every process would otherwise compile torch, Ray and the rest from source at each
# import, which made the suite 15 % slower.
UV_PIN := uv==0.13.10
$(STAMP): requirements.lock pyproject.toml
	@echo "==> [setup] installing the locked dependencies into $(VENV) with uv (a cold install takes about a minute)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q $(UV_PIN) $(PIP_QUIET_NOISE)
	@$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -r requirements.lock
	@echo "==> [setup] installing detserve itself (editable)"
	@$(VENV)/bin/uv pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	@touch $@

setup: $(STAMP)

# Default models: export the shipped weights (models/) into artifacts/, verified.
models: setup
	@echo "==> [models] exporting the default models into artifacts/ (once; checked against the weights after that)"
	@$(PY) -m detserve models

serve: models
	@echo "==> [serve] starting Ray and Serve on 127.0.0.1 (first replica start: about 20-40 s)"
	@$(PY) -m detserve serve $(SERVE_ARGS)

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

# Issue 10: peak, a 300-request burst, an open loop at 2x the peak, 64-image requests beside one-image ones (about 4 minutes).
bench-overload: models
	scripts/offline-run $(PY) -m detserve.benchmarks --overload $(BENCH_ARGS)

# Issue 11: detserve (deploy.yaml's yolo app, one replica) under open-loop load at 70% of its
# measured capacity for 10 minutes, good, bad and large requests mixed; pass/fail on the answers,
# the replica's RSS and the replica's and proxy's open fds (docs/operations.md, "Soak"). Writes bench-results/soak-*/.
soak: models
	scripts/offline-run $(PY) -m detserve.benchmarks.soak $(SOAK_ARGS)

# Regenerate the lock from pyproject.toml's pins (needs the registry).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q -e ".[test,bench]"
	.lock-venv/bin/pip freeze --exclude-editable | grep -v '^detserve' > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf artifacts .cache .pytest_cache

# Issue 13: the GPU check. Exports the default YOLO for a GPU pod (square letterbox,
# model.pt2) here, then runs benchmarks/gpu_check.py, which needs only torch,
# torchvision, numpy, pillow and opencv (no Ultralytics/Ray): on a machine
# without CUDA it says so and exits 0. Copy artifacts/gpu-check/ with the
# checkout to the GPU machine and run the last line there.
gpu-check: setup
	test -f artifacts/gpu-check/yolo/manifest.json || $(PY) -m detserve export --model yolo --weights models/yolo-shapes.pt --pod gpu-a100 --out artifacts/gpu-check/yolo --force
	$(PY) benchmarks/gpu_check.py --model artifacts/gpu-check/yolo --out artifacts/gpu-check/report
