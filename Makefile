# meshserve: two commands on a fresh clone -- `make up` serves the API, `make test` runs the suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: up install lock test proto proto-check lint bench bench-providers bench-infinity-venv bench-guidellm models clean

# The venv is (re)built when requirements.lock or pyproject.toml change. pip installs only uv (the
# lock's pin, hash-checked), and uv the rest: the same hash-checked pins, ~10x faster than pip here
# (cold caches: 23 s against 227 s). torch goes first and alone, from PyTorch's CPU index: PyPI's
# Linux torch is the multi-GB CUDA build. For CUDA:
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128`. A machine that keeps torch's CPU
# wheel in /opt/wheels (the CI machine, which cannot reach the index) takes that file instead.
# torch alone (--no-deps: its own dependencies are pinned in the lock, so no index but TORCH_INDEX is
# asked for them), then requirements.lock, every pin hashed (compiled from pyproject.toml with all
# extras by `make lock`; it leaves torch out), with --no-deps since the lock is already complete.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_FROM := $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),--no-index --find-links /opt/wheels,--index-url $(TORCH_INDEX))
UV := $(VENV)/bin/uv
UV_INSTALL := $(UV) pip install --python $(PY)
$(STAMP): requirements.lock requirements.nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	awk '/^uv==/ {p = 1; print; next} p && /^ / {print; next} {p = 0}' requirements.lock > $(VENV)/uv.txt
	$(PIP) install -q --disable-pip-version-check --require-hashes --no-deps -r $(VENV)/uv.txt
	@echo "installing torch 2.13.0 ($(TORCH_FROM); about 200 MB for the CPU build)"
	$(UV_INSTALL) --no-deps $(TORCH_FROM) torch==2.13.0
	@echo "installing the locked dependencies (requirements.lock, hash-checked)"
	$(UV_INSTALL) --require-hashes --no-deps -r requirements.lock
	@echo "installing the packages whose metadata over-reaches (requirements.nodeps.txt, --no-deps)"
	$(UV_INSTALL) -q --no-deps -r requirements.nodeps.txt
	$(UV_INSTALL) -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# huggingface_hub 0.36.2 (the last release before 1.x) for the old-client tests; it cannot share the
# venv with the current release, so it lives in its own folder that the test puts first on the path.
OLD_HUB := $(VENV)/hf-0.36/.installed
$(OLD_HUB): $(STAMP)
	@# pip's resolver warns that the folder's hub conflicts with the venv's: expected, it is kept apart.
	$(PIP) install -q --disable-pip-version-check --target $(VENV)/hf-0.36 huggingface_hub==0.36.2 requests==2.34.2 \
	  > $(VENV)/hf-0.36.log 2>&1 || { cat $(VENV)/hf-0.36.log; exit 1; }
	touch $(OLD_HUB)

install: $(STAMP)

## lock: recompile requirements.lock from pyproject.toml (all extras, hashes; torch left to TORCH_INDEX).
# Existing pins are kept unless pyproject asks otherwise; `make lock LOCK_ARGS=--upgrade` moves them all.
LOCK_TORCH := $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match)
lock: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml --extra triton --extra dev --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_35 --no-emit-package torch $(LOCK_TORCH) $(LOCK_ARGS) -o requirements.lock

## up: install, build the model catalog on first run, start the four services, print the URLs.
up: $(STAMP)
	$(VENV)/bin/meshserve up

models: $(STAMP)
	$(VENV)/bin/meshserve models build

# The dependency rules (.importlinter) and the function-length rule (scripts/check_code_shape.py).
LINT_IMPORTS := $(VENV)/bin/lint-imports --no-logo --no-cache .importlinter
CODE_SHAPE := $(PY) scripts/check_code_shape.py services

## test: contracts (buf lint/format/breaking, stub drift), lint, import contracts, function lengths, then the whole pytest suite.
test: $(STAMP) $(OLD_HUB)
	scripts/proto-check.sh
	$(VENV)/bin/ruff check services tests bench deploy scripts
	$(LINT_IMPORTS)
	$(CODE_SHAPE)
	$(VENV)/bin/meshserve models build
	$(PY) scripts/check_docs.py
	$(PY) scripts/gen_config_docs.py --check
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadgroup -p no:cacheprovider --durations=30

proto: $(STAMP)
	scripts/proto.sh

proto-check: $(STAMP)
	scripts/proto-check.sh

## lint: offline checks only: ruff, import contracts, function lengths, buf lint and format.
lint: $(STAMP)
	$(VENV)/bin/ruff check services tests bench deploy scripts
	$(LINT_IMPORTS)
	$(CODE_SHAPE)
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format -d --exit-code
	$(PY) scripts/check_docs.py
	$(PY) scripts/gen_config_docs.py --check

# infinity-emb, beside which bench.run_embeddings measures the mesh, lives in a venv of its own (it pins
# transformers < 5). Its torch engine only: its optimum (ONNX) engine needs optimum 1.x, whose exporter
# does not import under torch 2.13, and PyPI's older Linux torch wheels pull the CUDA stack.
INFINITY_VENV := .venv-bench/infinity
$(INFINITY_VENV)/.installed:
	test -x $(INFINITY_VENV)/bin/python || python3 -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/pip install -q --disable-pip-version-check --retries 2 --index-url $(TORCH_INDEX) torch==2.13.0
	$(INFINITY_VENV)/bin/pip install -q --disable-pip-version-check 'infinity-emb[server,torch,einops]==0.0.78' torch==2.13.0
	touch $@

## bench-infinity-venv: the infinity-emb venv that `make bench` compares embeddings with.
bench-infinity-venv: $(INFINITY_VENV)/.installed

## bench: every benchmark (embeddings, backends, classification, control plane, generation, a 30-minute soak); JSON + PNG in bench/results/.
bench: $(STAMP) $(INFINITY_VENV)/.installed
	$(VENV)/bin/meshserve models build
	$(PY) -m bench.run_embeddings --infinity $(INFINITY_VENV)/bin/infinity_emb
	$(PY) -m bench.run_backends
	$(PY) -m bench.run_classification
	$(PY) -m bench.run_user_models
	$(PY) -m bench.run_control_plane
	$(PY) -m bench.run_generation
	$(PY) -m bench.run_soak
	$(PY) -m bench.targets

# The LiteLLM proxy for bench-providers lives in a venv of its own (it pins its own FastAPI, pydantic...).
LITELLM_VENV := .venv-bench/litellm
$(LITELLM_VENV)/.installed:
	test -x $(LITELLM_VENV)/bin/python || python3 -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q --disable-pip-version-check 'litellm[proxy]==1.106.2'
	touch $@

## bench-providers: a fake OpenAI server direct, behind Envoy, LiteLLM and meshserve's gateway (wrk); JSON + PNG.
bench-providers: $(STAMP) $(LITELLM_VENV)/.installed
	command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(PY) -m bench.run_providers --litellm $(LITELLM_VENV)/bin/litellm

# guidellm (the vLLM ecosystem's serving benchmark) lives in a venv of its own (it pins its own
# transformers, pydantic...).
GUIDELLM_VENV := .venv-bench/guidellm
$(GUIDELLM_VENV)/.installed:
	test -x $(GUIDELLM_VENV)/bin/python || python3 -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/pip install -q --disable-pip-version-check 'guidellm==0.8.1'
	touch $@

## bench-guidellm: guidellm's synchronous and concurrent profiles on the chat route (tiny model, 200 requests each); bench/results/guidellm.json.
bench-guidellm: $(STAMP) $(GUIDELLM_VENV)/.installed
	$(VENV)/bin/meshserve models build
	$(PY) -m bench.run_guidellm --guidellm $(GUIDELLM_VENV)/bin/guidellm

clean:
	rm -rf $(VENV) .meshserve
