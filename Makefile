# Quick start:
#   make run    set up .venv, start a local cluster, submit the main job, stop it
#   make test   set up .venv, check formatting and lint, run the whole test suite

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= $(CURDIR)/out
PROVIDERS ?= 3
DASHBOARD ?= http://127.0.0.1:8265
# The main job and its arguments (override: make run MAIN='jobs/other.py --flag x').
MAIN ?= jobs/campus.py --out $(OUT)/campus

.PHONY: run test venv lint clean

venv: $(STAMP)

# torch is preinstalled only when absent, so a CUDA build the user already has stays;
# `torch==2.13.0` is a CPU build on machines that keep one on disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0 || $(BIN)/python -m pip install --quiet torch
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/raysys down >/dev/null 2>&1 || true
	$(BIN)/raysys up --providers $(PROVIDERS)
	$(BIN)/raysys submit --address $(DASHBOARD) -- python $(MAIN); \
	status=$$?; $(BIN)/raysys down; exit $$status

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
