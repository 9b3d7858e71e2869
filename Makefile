# Two entry points do all set-up on a fresh machine:
#   make demo   run the whole pipeline on real input (broker, Redis, SmolLM2, MT-Bench, Moby-Dick)
#   make test   run the default test suite (real broker, Redis, tokenizer and model)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch 2.13.0 installs from local disk; an unpinned torch downloads CUDA builds.
TORCH_PIN := torch==2.13.0

.PHONY: setup model tools demo test test-all bench clean

$(BIN)/sinkstream: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)" -e ".[dev]"
	touch $(BIN)/sinkstream

setup: $(BIN)/sinkstream

model: setup
	$(BIN)/sinkstream models fetch

tools: setup
	bash deploy/install-tools.sh $(BIN)/python

demo: model
	$(BIN)/sinkstream demo

test: model tools
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest

test-all: model tools
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -m "slow or not slow"

bench: model
	$(BIN)/python benchmarks/engine_decode.py --json docs/engine_decode.json

clean:
	rm -rf $(VENV) .pytest_cache
