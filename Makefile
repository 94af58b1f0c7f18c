# Two entry points on a fresh machine (Python 3.10+ with pip and venv):
#   make train   set up .venv, then run the main job
#   make test    set up .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: train test selfcheck compile-check clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m kernels.selfcheck

test: $(STAMP)
	$(PY) -m pytest tests -q -n 2

selfcheck: $(STAMP)
	$(PY) -m kernels.selfcheck

compile-check: $(STAMP)
	$(PY) -m bench.compile

clean-venv:
	rm -rf $(VENV)
