# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.merge-lab-installed
# torch is pinned before anything else: an unpinned torch pulls GBs of CUDA packages.
TORCH  := torch==2.13.0

# The web UIs pin old gradio versions (AUTOMATIC1111 1.10 and reForge: 3.41.2, Forge: 4.40.0) that cannot share a venv with current diffusers: the tab
# builder is tested on each in its own venv, without the preview extra (pins: the hosts' own requirements files).
GRADIO3_PINS := gradio==3.41.2 fastapi==0.94.0 httpx==0.24.1 "huggingface_hub<1.0"
GRADIO4_PINS := gradio==4.40.0 fastapi==0.112.2 pydantic==2.10.6 "huggingface_hub<1.0"

.PHONY: setup tokenizer setup-gradio3 setup-gradio4 setup-browser demo test lint clean

setup: $(STAMP) tokenizer

setup-gradio3: .venv-gradio3/.merge-lab-installed
setup-gradio4: .venv-gradio4/.merge-lab-installed

# The browser test drives Debian's chromium with pip's playwright (no `playwright install` download).
setup-browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

.venv-gradio3/.merge-lab-installed: pyproject.toml
	$(PYTHON) -m venv .venv-gradio3
	.venv-gradio3/bin/python -m pip install --quiet --upgrade pip
	.venv-gradio3/bin/python -m pip install --quiet $(TORCH)
	.venv-gradio3/bin/python -m pip install --quiet -e . pytest $(GRADIO3_PINS) $(TORCH)
	touch $@

.venv-gradio4/.merge-lab-installed: pyproject.toml
	$(PYTHON) -m venv .venv-gradio4
	.venv-gradio4/bin/python -m pip install --quiet --upgrade pip
	.venv-gradio4/bin/python -m pip install --quiet $(TORCH)
	.venv-gradio4/bin/python -m pip install --quiet -e . pytest $(GRADIO4_PINS) $(TORCH)
	touch $@

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[preview,ui,dev]" $(TORCH)
	touch $(STAMP)

# The CLIP vocabulary for previews, built once into the user cache from the open-clip-torch wheel on PyPI
# (not committed, never fetched at render time); a no-op when already built.
tokenizer: $(STAMP)
	$(BIN)/merge-lab setup-tokenizer --quiet

demo: setup
	$(BIN)/merge-lab demo

# ruff, and the import layers of pyproject.toml's [tool.importlinter] (docs/engine.md)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

# Test files run in parallel, one worker a CPU (at most 4; a module's tests share a worker and its fixtures):
# 9 minutes instead of 17 on a 2-core machine.
test: setup setup-gradio3 setup-gradio4 setup-browser lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

clean:
	rm -rf $(VENV) .venv-gradio3 .venv-gradio4 demo-output xyz-output previews tests/_cache .pytest_cache
