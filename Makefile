# The two commands of the README. Each sets up what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/ssni: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU wheel; installing it first keeps pip from pulling a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,real,diffusers]"
	touch $(BIN)/ssni

setup: $(BIN)/ssni

demo: setup
	$(BIN)/ssni demo --quick --out out/demo

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) out
