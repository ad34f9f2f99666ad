# Two commands set up everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.reslab-installed

.PHONY: demo test lint readme-table

# Create the venv and install the project (editable, with test tools) when missing or when pyproject changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	touch $@

demo: $(STAMP)
	$(BIN)/reslab models
	$(BIN)/reslab summary resnet50
	$(BIN)/reslab summary resnet20 --input-size 1 28 28 --num-classes 10

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# README's model table is this command's output (tests/test_cli.py checks they agree).
readme-table: $(STAMP)
	$(BIN)/reslab models --format markdown
