# One place for the commands the README promises. `make test` is what CI runs.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
EXTRAS ?= cpu,dev,export

# Use the shared offline CIFAR-10 copy when it sits beside the checkout.
ifneq ($(wildcard ../shared/data/cifar10/train),)
export CIFAR10_DIR ?= $(abspath ../shared/data/cifar10)
endif

.PHONY: setup test test-slow lint quickstart clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

setup: $(VENV)/.installed

# lint-imports: the import rules of pyproject.toml's [tool.importlinter] (layers, no cycles).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo --no-cache

# Tests run in $(TEST_WORKERS) processes (pytest-xdist), one more than the cores: a test
# often waits on a subprocess it started, and a third worker on 2 cores kept them busier
# (187% CPU against 175% with two; bench/RESULTS.md). Long tests are handed out
# first-come (worksteal), so no core idles at the end.
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print((os.cpu_count() or 1) + 1)')
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test: lint
	$(PYTEST)

test-slow: setup
	$(PYTEST) -m slow

# No --workdir: the run goes to runs/quickstart, or to runs/quickstart-2, -3, ... when that
# folder holds a run of another config (an older quickstart's), which is left as it is.
quickstart: setup
	$(BIN)/launch train --config configs/quickstart.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
