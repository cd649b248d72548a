# One-command set-up: `make demo` and `make test` each install everything they need on a fresh
# machine (a local virtualenv with pinned versions, and the apt/npm tools the tests use).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := infra/dynalite/node_modules/.installed

.PHONY: install demo test lint unit bench clean

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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis demo-output
