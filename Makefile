# Two entry points, each creating the virtual environment it needs:
#   make demo   runs the four demo models on the credit-card data
#               (set GRADWATCH_DATA or pass ARGS="--data DIR")
#   make test   runs the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[demos,dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m demos $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check keras_gradwatch demos tests

clean:
	rm -rf $(VENV) build *.egg-info demo-output

# make bench   times GradWatch against plain fit, TensorBoard and a naive
#              callback (about 25 minutes on two cores; see docs/benchmarks.md)
.PHONY: bench
bench: $(VENV)/.installed
	$(PY) bench/run.py $(ARGS)
