# One-command set-up: `make demo` and `make test` each install everything they need on a fresh
# machine (a local virtualenv with pinned versions, and the apt/npm tools the tests use).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := infra/dynalite/node_modules/.installed

.PHONY: install demo test lint unit bench clean build-WebhookFunction lambda

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# dynalite: an independent DynamoDB implementation the store tests cross-check against (npm).
$(NODE_STAMP): infra/dynalite/package.json infra/dynalite/package-lock.json
	cd infra/dynalite && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

install: $(STAMP) $(NODE_STAMP)

demo: install
	$(BIN)/parley demo

lint: install
	$(BIN)/ruff check core handlers infra tests
	$(BIN)/ruff format --check core handlers infra tests
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest

test: lint unit

bench: install
	$(BIN)/parley bench

# `sam build` (BuildMethod: makefile) calls this with ARTIFACTS_DIR: the webhook's code and only its
# own dependencies, as wheels for Lambda's arm64 Python 3.13.
ARTIFACTS_DIR ?= build/lambda
LAMBDA_PLATFORM ?= manylinux2014_aarch64
LAMBDA_PYTHON ?= 3.13
# Lambda's /var/task is read-only: bytecode not shipped is compiled again at every cold start.
LAMBDA_COMPILER ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/$(LAMBDA_PYTHON)*/bin/python$(LAMBDA_PYTHON)) python$(LAMBDA_PYTHON))
build-WebhookFunction:
	rm -rf $(ARTIFACTS_DIR) && mkdir -p $(ARTIFACTS_DIR)
	cp -r core handlers $(ARTIFACTS_DIR)/
	find $(ARTIFACTS_DIR) -name __pycache__ -prune -exec rm -rf {} +
	$(PYTHON) infra/lambda_requirements.py > $(ARTIFACTS_DIR)/.requirements.txt
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-compile --target $(ARTIFACTS_DIR) \
		--platform $(LAMBDA_PLATFORM) --implementation cp --python-version $(LAMBDA_PYTHON) --only-binary=:all: \
		-r $(ARTIFACTS_DIR)/.requirements.txt
	$(LAMBDA_COMPILER) -m compileall -q -j 0 --invalidation-mode unchecked-hash $(ARTIFACTS_DIR) \
		|| echo "warning: no python$(LAMBDA_PYTHON) to precompile the bundle; cold starts will compile it"

lambda: build-WebhookFunction
	cd $(ARTIFACTS_DIR) && rm -f ../webhook.zip && zip -qr9 ../webhook.zip . && du -sh . ../webhook.zip

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis demo-output bench-output build
