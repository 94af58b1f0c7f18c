# Two entry points on a fresh machine (Python 3.10+ with pip and venv):
#   make train   set up .venv, then train the tiny preset on the built-in corpus and sample from it
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
	$(PY) -m fastlm train --preset tiny --out runs/quickstart --overwrite
	$(PY) -m fastlm sample --run runs/quickstart --prompt "class" --max_new_tokens 120 --num_samples 2

test: $(STAMP)
	$(PY) -m pytest tests -q -n 2

selfcheck: $(STAMP)
	$(PY) -m kernels.selfcheck

compile-check: $(STAMP)
	$(PY) -m bench.compile

clean-venv:
	rm -rf $(VENV)
