.PHONY: setup test lint unit demo bench clean

VENV := .venv
PY := $(VENV)/bin/python

setup:
	@bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q tests

unit: setup
	$(PY) -m pytest -q -m "not slow" tests

demo:
	@bash scripts/setup.sh --demo
	$(PY) -m shoal.demo

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
