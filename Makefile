# One place for the commands the README promises. `make test` is what CI runs.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
EXTRAS ?= cpu,dev

# Use the shared offline CIFAR-10 copy when it sits beside the checkout.
ifneq ($(wildcard ../shared/data/cifar10/train),)
export CIFAR10_DIR ?= $(abspath ../shared/data/cifar10)
endif

.PHONY: setup test lint quickstart clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

test-slow:
	$(BIN)/python -m pytest -q -m slow

quickstart: setup
	$(BIN)/launch train --config configs/quickstart.yaml --workdir runs/quickstart

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
