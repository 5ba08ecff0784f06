# Two entry points, each doing all of its own set-up on a fresh machine:
#   make demo   -> create .venv, install, train the example with the plugins, print the report path
#   make test   -> create .venv, install with the dev extra, run the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is pinned first: a CPU wheel of it lies on these machines; an unpinned
# torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/tabular/demo.py --output-dir demo_output

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lightning_sustain tests benchmarks examples

clean:
	rm -rf $(VENV) demo_output lightning_logs .pytest_cache
