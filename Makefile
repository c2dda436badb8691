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

## Run the test suite. The scaled topology's tests (PostgreSQL, Redis, HAProxy: minutes spent
## waiting on Prefect's crash detection, and a 200-run load test) run in a second pytest
## beside the rest, at a lower CPU priority so they take only what the rest leaves; their
## report follows the main one. `pytest` alone runs everything in one process.
test: $(BIN)/runners-orchestrator $(TS_CLIENT)
	@nice -n 15 $(BIN)/pytest -m scaled -p no:cacheprovider > .scaled-tests.log 2>&1 & scaled=$$!; \
	trap 'kill -INT $$scaled 2>/dev/null' INT TERM; \
	$(BIN)/pytest -m "not scaled"; rest=$$?; \
	wait $$scaled; scaled_rc=$$?; \
	echo "==== scaled topology tests (pytest -m scaled, run beside the rest) ===="; \
	cat .scaled-tests.log; \
	echo "main suite exit code $$rest, scaled tests exit code $$scaled_rc"; \
	[ $$rest -eq 0 ] && [ $$scaled_rc -eq 0 ]

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
