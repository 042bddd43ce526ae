# Every target creates the virtual environment it needs; nothing is installed by hand.
# On GPU machines set TORCH to your CUDA build (e.g. TORCH="torch==2.5.1") and EXTRAS=dev,gpu.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev
PY := $(VENV)/bin/python

.PHONY: env test lint shards tokenizer pretrain bench-data bench-model clean

env: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

lint: env
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
