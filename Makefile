# Two commands do all set-up from a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qflare-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FMNIST_CACHE := $(HOME)/.cache/qflare/datasets/fashion-mnist
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test install data bench check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned to the CPU wheel; the package's own torch range admits it, so the second
# install never pulls a newer (CUDA) build on top.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,tracking]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST: Debian's package where apt exists, else the loader's own checked download.
data: install
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(FMNIST_CACHE)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST present"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  $(BIN)/qflare data download fashion-mnist; \
	fi

demo: data
	$(BIN)/qflare demo $(DEMO_ARGS)

test: data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The gates CI runs before the tests: formatting, lint and types over the package.
check: install
	$(BIN)/ruff format --check qflare
	$(BIN)/ruff check qflare
	$(BIN)/mypy

bench: data
	$(BIN)/qflare bench fmnist-dir05

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis runs
