# Corral developer tasks. Everything runs from .venv/bin, so nothing needs activating.
# `make` alone lists the targets.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.corral-dev-installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv test lint format demo run bench bench-smoke dashboard clean distclean

help: ## list the targets
	@echo "Corral make targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  %-12s %s\n", $$1, $$2}'
	@echo "Variables: PYTHON=$(PYTHON)  PYTEST_ARGS='$(PYTEST_ARGS)'"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstalls only when pyproject.toml changes; delete the stamp to force it.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $@

venv: $(STAMP) ## create .venv and install corral with its dev extras (idempotent)

test: venv ## run the test suite (extra pytest flags: PYTEST_ARGS='-k stream -x')
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv ## ruff check, ruff format --check, mypy --strict, import-linter's layer contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: venv ## apply ruff format and ruff's automatic fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: venv ## start Redis, a gateway, workers and a fake Ollama; run a demo; tear down
	$(BIN)/corral demo

run: venv ## like demo, but keep everything running until Ctrl-C (PORT=11434 picks the gateway's port)
	$(BIN)/corral demo --keep $(if $(PORT),--port $(PORT))

bench: venv ## run the benchmarks
	$(BIN)/python bench/run_all.py

bench-smoke: venv ## run each benchmark briefly, two at a time (a quick check that they work)
	$(BIN)/python bench/run_all.py --smoke --jobs 2

# rq-dashboard listens on localhost only (reach it from elsewhere through an SSH tunnel);
# RQ_DASHBOARD_USERNAME/PASSWORD turn on its basic auth. Its Redis: CORRAL_REDIS_URL, else
# the one a running `make run` wrote to .corral/run.env, else 127.0.0.1:6379/0.
dashboard: venv ## rq-dashboard (dead letters) on 127.0.0.1:9181, on the Redis of `make run` or CORRAL_REDIS_URL
	@if [ -z "$${CORRAL_REDIS_URL:-}" ] && [ -f .corral/run.env ]; then . ./.corral/run.env; fi; \
	url=$${CORRAL_REDIS_URL:-redis://127.0.0.1:6379/0}; \
	echo "rq-dashboard on http://127.0.0.1:$${RQ_DASHBOARD_PORT:-9181} for $$url"; \
	$(BIN)/rq-dashboard --bind 127.0.0.1 --port $${RQ_DASHBOARD_PORT:-9181} --redis-url "$$url" \
		$${RQ_DASHBOARD_USERNAME:+--username "$$RQ_DASHBOARD_USERNAME" --password "$$RQ_DASHBOARD_PASSWORD"}

clean: ## remove caches and build output (keeps .venv)
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name '*.egg-info' -prune -exec rm -rf {} +
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## clean, and remove .venv too
	rm -rf $(VENV)
