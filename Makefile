# The two Quickstart commands: `make dev` runs the stack, `make test` runs the tests.
# Both create .venv on first use and refresh it whenever pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: dev test lint bench clean

# The upstream TypeScript orchestrator's oRPC client, which a test drives against our runner server.
TS_CLIENT := tests/ts_client/node_modules/.package-lock.json

$(TS_CLIENT): tests/ts_client/package-lock.json
	npm ci --prefix tests/ts_client --no-audit --no-fund --silent

$(BIN)/runners-orchestrator: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

## Run the main job: Prefect on SQLite, two runner servers, the flows served, the API.
dev: $(BIN)/runners-orchestrator
	$(BIN)/runners-orchestrator dev

## Run the test suite.
test: $(BIN)/runners-orchestrator $(TS_CLIENT)
	$(BIN)/pytest

## Lint, format check and type check, as CI does.
lint: $(BIN)/runners-orchestrator
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/runners-orchestrator deploy --check

## Measure the runner server's throughput (see docs/benchmarks.md).
bench: $(BIN)/runners-orchestrator
	$(BIN)/python bench/runner_server_rps.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
