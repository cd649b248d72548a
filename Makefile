# One-command set-up: `make demo` and `make test` each install everything they need on a fresh
# machine (a local virtualenv with pinned versions, and the apt/npm tools the tests use).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := infra/dynalite/node_modules/.installed

.PHONY: install demo test lint unit unit-prod bench clean build-WebhookFunction lambda lock

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# dynalite: an independent DynamoDB implementation the store tests cross-check against (npm).
$(NODE_STAMP): infra/dynalite/package.json infra/dynalite/package-lock.json
	cd infra/dynalite && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

# aws-sam-cli for `sam validate --lint`, in a virtualenv of its own: it pins boto3, jsonschema and
# others to versions of its choosing.
SAM_VENV := .venv-sam
SAM_STAMP := $(SAM_VENV)/.installed
$(SAM_STAMP):
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install --quiet --disable-pip-version-check aws-sam-cli==1.170.0
	touch $(SAM_STAMP)

# The production interpreter (Lambda's python3.13, the image's 3.13), from pyenv when it has one.
PYTHON_PROD ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
PROD_VENV := .venv-3.13
PROD_STAMP := $(PROD_VENV)/.installed
$(PROD_STAMP): pyproject.toml
	$(PYTHON_PROD) -m venv $(PROD_VENV)
	$(PROD_VENV)/bin/pip install --quiet --disable-pip-version-check --upgrade pip
	$(PROD_VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(PROD_STAMP)

install: $(STAMP) $(NODE_STAMP)

demo: install
	$(BIN)/parley demo

lint: install $(SAM_STAMP)
	$(BIN)/ruff check core handlers infra tests
	$(BIN)/ruff format --check core handlers infra tests
	$(BIN)/mypy
	SAM_CLI_TELEMETRY=0 AWS_DEFAULT_REGION=us-east-1 $(SAM_VENV)/bin/sam validate --lint --template template.yaml

# The whole suite runs under the production interpreter (3.13), the real-time end-to-end tests and
# the demo included; under the default one (3.11, where audioop still exists to be an oracle) the
# tests that take no real time run again, so every test runs on both ends of what is supported
# within CI's 15 minutes.
unit: install
	$(BIN)/python -m pytest --ignore=tests/e2e --ignore=tests/infra/test_demo.py

unit-prod: install $(PROD_STAMP)
	$(PROD_VENV)/bin/python -m pytest -p no:cacheprovider

test: lint unit unit-prod

bench: install
	$(BIN)/parley bench

# The locks the image and the Lambda bundle install from: every version and every file's hash, for
# any platform (uv's universal resolution); the Lambda's is held to the image's versions. Regenerate
# after changing pyproject.toml's pins.
UV_LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --quiet --custom-compile-command "make lock"
lock: install
	$(BIN)/python infra/lambda_requirements.py > requirements/lambda.in
	$(BIN)/python infra/lambda_requirements.py --all > requirements/media.in
	cd requirements && ../$(BIN)/uv pip compile media.in $(UV_LOCK_FLAGS) -o media.txt
	cd requirements && ../$(BIN)/uv pip compile lambda.in -c media.txt $(UV_LOCK_FLAGS) -o lambda.txt

# `sam build` (BuildMethod: makefile, samconfig.toml: build_in_source) calls this with ARTIFACTS_DIR:
# the webhook's code and only its own dependencies, from the lock with their hashes, as wheels for
# Lambda's arm64 Python 3.13 (Amazon Linux 2023: manylinux_2_28 wheels, which numpy 2.4 and others
# now ship, as well as manylinux2014 ones).
ARTIFACTS_DIR ?= build/lambda
# Litestar's CLI and test-data extras, which the webhook never imports (tests/infra/test_build.py runs
# the pruned bundle): 40 MB of the bundle.
LAMBDA_UNUSED := faker polyfactory pygments rich rich_click click
LAMBDA_PLATFORMS ?= manylinux_2_28_aarch64 manylinux2014_aarch64
LAMBDA_PYTHON ?= 3.13
# Lambda's /var/task is read-only: bytecode not shipped is compiled again at every cold start.
LAMBDA_COMPILER ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/$(LAMBDA_PYTHON)*/bin/python$(LAMBDA_PYTHON)) python$(LAMBDA_PYTHON))
build-WebhookFunction:
	rm -rf $(ARTIFACTS_DIR) && mkdir -p $(ARTIFACTS_DIR)
	cp -r core handlers $(ARTIFACTS_DIR)/
	find $(ARTIFACTS_DIR) -name __pycache__ -prune -exec rm -rf {} +
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-compile --target $(ARTIFACTS_DIR) \
		$(addprefix --platform ,$(LAMBDA_PLATFORMS)) --implementation cp --python-version $(LAMBDA_PYTHON) \
		--only-binary=:all: --require-hashes -r requirements/lambda.txt
	cd $(ARTIFACTS_DIR) && rm -rf $(foreach package,$(LAMBDA_UNUSED),$(package) $(package)-*.dist-info) bin
	$(LAMBDA_COMPILER) -m compileall -q -j 0 --invalidation-mode unchecked-hash $(ARTIFACTS_DIR) \
		|| echo "warning: no python$(LAMBDA_PYTHON) to precompile the bundle; cold starts will compile it"

lambda: build-WebhookFunction
	cd $(ARTIFACTS_DIR) && rm -f ../webhook.zip && zip -qr9 ../webhook.zip . && du -sh . ../webhook.zip

clean:
	rm -rf $(VENV) $(SAM_VENV) $(PROD_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis demo-output bench-output build
