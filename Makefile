# Every target installs what it needs: a fresh clone with Python 3.11+ and git is enough.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_REPO := example-run/repo

.PHONY: demo test check bench postgres clean

$(BIN)/workflow-manager: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## demo: the batch runner on the bundled example prompts, offline, on the local forge
demo: $(BIN)/workflow-manager
	$(BIN)/python examples/make_repo.py $(DEMO_REPO)
	WORKFLOW_AGENT_COMMAND='{python} $(CURDIR)/examples/agent.py {prompt_file}' \
		$(BIN)/workflow-manager batch examples/prompts --project-root $(DEMO_REPO)

## test: the whole test suite (the PostgreSQL tests start a throwaway server of their own)
test: $(BIN)/workflow-manager
	$(BIN)/python -m pytest -q

## postgres: a throwaway PostgreSQL server for development; prints its URL, Ctrl-C stops it
postgres: $(BIN)/workflow-manager
	$(BIN)/python tests/postgres_server.py

## check: linters and type checks
check: $(BIN)/workflow-manager
	$(BIN)/ruff check reliability machines benchmarks tests
	$(BIN)/mypy reliability machines

## bench: the benchmark suite (see README, Performance)
bench: $(BIN)/workflow-manager
	$(BIN)/python -m benchmarks --json bench-results/latest.json

clean:
	rm -rf $(VENV) example-run bench-results build
