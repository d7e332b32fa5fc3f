# fedguard — the two commands of the README, each installing what it needs on a fresh machine.
#   make demo   the main job (for now: a federated simulation with a per-round table)
#   make test   the test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fedguard-installed

.PHONY: install demo test test-all lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt Makefile
	@echo ">> creating $(VENV) and installing fedguard (first run: about 3 minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and alone, pinned to the CPU wheel: a later resolver run cannot then pull a CUDA build.
	$(PIP) install --quiet -c constraints/cpu.txt torch
	$(PIP) install --quiet -c constraints/cpu.txt -e '.[train,dp,mpc,dev]'
	# CrypTen 0.4.1 is installed without its declared dependencies: they pull torchvision (which breaks
	# transformers' imports beside this torch) and the dead `sklearn` package. Its real runtime
	# dependencies come from the `mpc` extra above; fedguard.secagg.mpc patches its torch-2.13 breakage.
	$(PIP) install --quiet --no-deps crypten==0.4.1
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedguard demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -n 2 --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check fedguard fedguard_train attacks audits tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
