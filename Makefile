# `make demo` and `make test` do all the set-up: a virtualenv in .venv with requirements installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel (on local disk on our machines); on a GPU box: make TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-slow test-floors lint clean

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $@

demo: $(VENV)/.installed
	PY=$(PY) bash demo/run_demo.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# The checks marked slow (run by CI after `make test`).
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# The everyday suite against the lowest versions requirements.txt allows (constraints-floors.txt pins them exactly),
# in a virtualenv of its own inside .venv/ (ignored by git and ruff); not part of `make test`. torch is $(TORCH).
FLOORS_VENV ?= .venv/floors
FLOORS_PY := $(FLOORS_VENV)/bin/python

$(FLOORS_VENV)/.installed: requirements.txt requirements-dev.txt constraints-floors.txt
	test -x $(FLOORS_PY) || $(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_PY) -c "import torch" 2>/dev/null || $(FLOORS_PY) -m pip install --quiet $(TORCH)
	$(FLOORS_PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints-floors.txt
	touch $@

test-floors: $(FLOORS_VENV)/.installed
	$(FLOORS_PY) -m pytest -q

clean:
	rm -rf demo_output .pytest_cache .ruff_cache
