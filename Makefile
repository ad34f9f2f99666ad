# Two commands set up everything on a fresh machine: `make demo` and `make test`; `make docs` builds the site.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.reslab-installed

.PHONY: demo test lint docs docs-pages fashion-mnist chromium

# Create the venv and install the project (editable, with test tools, the ONNX extra and the docs tools) when
# missing or when pyproject changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev,deploy,docs]' 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	touch $@

# The main job: train the demo recipe on Fashion-MNIST, evaluate it on the test set, predict a few test images.
DEMO_RUN := runs/demo
demo: $(STAMP) fashion-mnist
	@start=$$SECONDS; \
	$(BIN)/reslab train --recipe recipes/fashion_mnist_demo.yaml --out-dir $(DEMO_RUN) --overwrite && \
	$(BIN)/reslab eval $(DEMO_RUN)/best.pt && \
	$(BIN)/reslab samples --dataset fashion-mnist --count 4 --out-dir $(DEMO_RUN)/samples > $(DEMO_RUN)/samples.txt && \
	$(BIN)/reslab predict $(DEMO_RUN)/best.pt $$(cat $(DEMO_RUN)/samples.txt) && \
	echo && echo "checkpoint:  $(DEMO_RUN)/best.pt (resume state: $(DEMO_RUN)/last.pt)" && \
	echo "TensorBoard: tensorboard --logdir $(DEMO_RUN)/tensorboard" && \
	echo "report:      $(DEMO_RUN)/report.html (curves, test results, image grids, gradient norms)" && \
	echo "metrics:     $(DEMO_RUN)/metrics.jsonl, $(DEMO_RUN)/results.json, $(DEMO_RUN)/eval_test.json" && \
	echo "demo took $$((SECONDS - start)) s after set-up"

# Fashion-MNIST from Debian's package (the files land in /usr/share/datasets/fashion-mnist).
fashion-mnist:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || ls /usr/share/datasets/fashion-mnist/*.gz >/dev/null 2>&1 || \
	{ echo "installing Debian's dataset-fashion-mnist"; \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; } || \
	echo "could not install dataset-fashion-mnist; pass --data-dir or set RESLAB_DATA to Fashion-MNIST's files"

# Debian's chromium, for the test that opens the HTML pages (report.html, explain's index.html) in a headless
# browser. Where apt-get cannot install it, that test is skipped and the build goes on.
chromium:
	@command -v chromium >/dev/null 2>&1 || \
	{ echo "installing Debian's chromium"; \
	  (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null 2>&1; } || \
	echo "could not install chromium; the headless-browser test will be skipped"

test: $(STAMP) chromium fashion-mnist
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# The documentation site (mkdocs.yml, docs/) built into site/; a broken link or anchor fails the build, and so
# does a generated block that no longer says what its JSON file says. NO_MKDOCS_2_WARNING quiets the notice that
# Material 9 prints at every build (its end of life in 2027; pyproject keeps MkDocs below 2).
docs: $(STAMP)
	$(BIN)/python benchmarks/docs_pages.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Rewrite the generated blocks of README.md and docs/ (model table, explain summaries, result tables) from
# benchmarks/results/*.json and `reslab models` (tests/docs/test_pages.py checks they agree).
docs-pages: $(STAMP)
	$(BIN)/python benchmarks/docs_pages.py
