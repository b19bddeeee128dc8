# meshserve: two commands on a fresh clone -- `make up` serves the API, `make test` runs the suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: up install test test-fast proto proto-check lint bench models clean

# The venv is (re)built when requirements.lock or pyproject.toml change. torch goes first and alone so
# that pip takes the local CPU wheel (torch==2.13.0) and never pulls a CUDA build.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -r requirements.lock
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

## up: install, build the model catalog on first run, start the four services, print the URLs.
up: $(STAMP)
	$(VENV)/bin/meshserve up

models: $(STAMP)
	$(VENV)/bin/meshserve models build

## test: contracts (buf lint/format/breaking, stub drift), lint, then the whole pytest suite.
test: $(STAMP)
	scripts/proto-check.sh
	$(VENV)/bin/ruff check services tests bench deploy
	$(VENV)/bin/meshserve models build
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadgroup -p no:cacheprovider

proto: $(STAMP)
	scripts/proto.sh

proto-check: $(STAMP)
	scripts/proto-check.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check services tests bench deploy
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format -d --exit-code

## bench: raw torch limit, inference service alone, full mesh; JSON + PNG in bench/results/.
bench: $(STAMP)
	$(VENV)/bin/meshserve models build
	$(PY) -m bench.run_embeddings
	$(PY) -m bench.run_backends

clean:
	rm -rf $(VENV) .meshserve
