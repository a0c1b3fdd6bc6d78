# Two commands set everything up on a fresh machine:
#   make demo   compile the tiny example and generate from it
#   make test   run the test suite (make test-all also runs the slow tests)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
TEST := $(VENV)/.installed-test
PROMPT ?= def fibonacci(n):

.PHONY: demo test test-all clean

$(CORE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $@

$(TEST): $(CORE)
	# test-only extras: transformers (the numerical oracle), pytest, hypothesis, ml-dtypes
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(CORE)
	$(PY) -m v4c compile examples/tiny-v4/model.yaml -o build/tiny-v4
	$(PY) -m v4c generate build/tiny-v4 --prompt "$(PROMPT)" --max-new-tokens 120

# one pytest worker per core (pytest-xdist): the quick suite took 21 minutes in one process on 2 cores, 13 in two
test: $(TEST)
	$(PY) -m pytest -q -m "not slow" -n auto

test-all: $(TEST)
	$(PY) -m pytest -q -n auto

clean:
	rm -rf $(VENV) build .pytest_cache
