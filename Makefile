# mtrec — one-command install, demo and tests. Every target builds .venv first if needed.
#   make demo      install if needed, then run `mtrec demo`
#   make test      install if needed, then run the whole test suite
#   make install   build .venv from the pinned lock files (idempotent)
#   make lint      ruff (lint rules and formatting) over every package
# VARIANT=cuda installs the CUDA torch + fbgemm-gpu instead (GPU machines; see docs/install.md).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
VARIANT ?= cpu
STAMP := $(VENV)/.installed-$(VARIANT)
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): deploy/lock/common.txt deploy/lock/cpu.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(VARIANT),cuda)
	$(PIP) install torch==2.13.0 fbgemm-gpu==1.8.0
	$(PIP) install --no-deps -r deploy/lock/common.txt
else
	$(PIP) install --no-deps -r deploy/lock/cpu.txt
endif
	$(PIP) install --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: install
	$(BIN)/mtrec demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check mtrec pipelines tests bench
	$(BIN)/ruff format --check mtrec pipelines tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
