# Two set-up commands on a fresh machine with Python 3.11+:  make demo  /  make test
# Each creates .venv and installs what it needs (once; again when pyproject.toml changes).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ifeq ($(OS),Windows_NT)
BIN    := $(VENV)/Scripts
endif
STAMP  := $(VENV)/.livescope-installed
# torch: pinned so pip never resolves an open range to a multi-GB CUDA build by accident.
# Where no NVIDIA GPU is present, point TORCH_PIP_ARGS at a CPU wheel index if your pip
# does not already have a CPU build (see README, "Installing").
TORCH_VERSION  ?= 2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo test lint install bench clean screenshot wheel

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "livescope needs Python 3.11+ (zarr-python 3)"'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e ".[ui,ml,test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/livescope demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# the wheel users install with pip (docs/install.md); CI builds it (.ci/run)
wheel: $(STAMP)
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w dist .
	@ls dist/livescope-*.whl

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	@echo "benchmarks: see bench/README.md (each script prints a markdown table)"

clean:
	rm -rf $(VENV) dist build livescope-demo.zarr livescope-demo.zarr.png .pytest_cache
