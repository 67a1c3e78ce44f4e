# Two commands for a fresh Debian 12 machine with Python 3.11, as root:
#   make demo   install, verify and uninstall prometheus-node-exporter in a sandbox
#   make test   install what the tests need, then lint, type-check and run them
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/workflow-agent: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# Bytecode now: where PYTHONDONTWRITEBYTECODE is set, every run would recompile.
	$(BIN)/python -m compileall -q src
	touch $@

demo: $(BIN)/workflow-agent
	scripts/system-deps.sh
	$(BIN)/workflow-agent demo prometheus-node-exporter

test: $(BIN)/workflow-agent
	scripts/system-deps.sh --test
	$(BIN)/ruff check
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(BIN)/workflow-agent
	scripts/system-deps.sh --test
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
