# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.merge-lab-installed
# torch is pinned before anything else: an unpinned torch pulls GBs of CUDA packages.
TORCH  := torch==2.13.0

.PHONY: setup tokenizer demo test lint clean

setup: $(STAMP) tokenizer

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

lint: setup
	$(BIN)/ruff check .

test: setup lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-output xyz-output previews tests/_cache .pytest_cache
