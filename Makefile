# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
# `make bench` (or `make bench-quick`) writes benchmarks/results/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean bench bench-quick

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m multihead demo

# The set-up installs the bench extra too (it holds no torch requirement, so the pinned CPU
# torch stays), so that the suite's benchmark and export tests run rather than skip.
bench: $(STAMP)
	$(PY) -m multihead bench

bench-quick: $(STAMP)
	$(PY) -m multihead bench --quick

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
