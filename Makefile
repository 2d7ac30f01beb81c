# The two commands of the README: `make dev` (the main job) and `make test` (the whole suite).
# Both do all set-up on a fresh machine with Python 3.11+, Java 17 and Maven.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup dev test lint unit bench down

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "planpipe needs Python 3.11+"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

dev: setup
	$(BIN)/planpipe dev

lint: setup
	$(BIN)/ruff check planpipe planpipe_tests bench
	$(BIN)/ruff format --check planpipe planpipe_tests bench
	$(BIN)/mypy
	DAGSTER_HOME=$$(mktemp -d) $(BIN)/dagster definitions validate -w workspace.yaml

unit: setup
	$(BIN)/pytest -m unit -q

test: lint
	./scripts/install-chromium.sh
	./scripts/install-redis.sh
	$(BIN)/pytest -q --durations=15

bench: setup
	$(BIN)/planpipe bench ingest

down: setup
	$(BIN)/planpipe down
