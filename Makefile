# Two entry points, each doing all of its own set-up on a fresh machine:
#   make demo   -> create .venv, install, train the example with the plugins, print the report path
#   make test   -> create .venv, install with the dev extra, run the whole test suite
#   make test-compat -> a second venv (.venv-compat): a fast subset against the oldest and
#                       the newest Lightning 2.x we claim (pyproject's lower bound and <3)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is pinned first: a CPU wheel of it lies on these machines; an unpinned
# torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-compat lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/tabular/demo.py --output-dir demo_output

test: $(VENV)/.installed
	$(PY) -m pytest -q --reruns 2 --reruns-delay 1

# Lightning versions: the oldest we claim (pyproject's lower bound) and the newest 2.x.
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
# the oldest is read from pyproject's "lightning>=X" so the claim and the test stay together
COMPAT_OLDEST := $(shell sed -n 's/.*"lightning>=\([0-9.]*\).*/\1/p' pyproject.toml | head -n 1)
COMPAT_LIGHTNING ?= "lightning==$(COMPAT_OLDEST).*" "lightning>=$(COMPAT_OLDEST),<3"
COMPAT_TESTS ?= tests/test_compat.py tests/test_strategies_any.py tests/test_efficiency.py \
	tests/test_ddp_strategy.py::test_rank_raising_mid_step_other_rank_exits_and_limits_restored \
	tests/test_energy_monitor_cpu.py::test_summary_and_trace_with_csv_logger \
	tests/test_energy_monitor_cpu.py::test_validate_and_test_accounted_separately \
	tests/test_budget_energy.py::test_budget_smaller_than_one_step_says_so \
	tests/test_ddp_cli.py \
	tests/test_fabric_sustain_ddp.py::test_fabric_resolves_sustain_ddp_to_the_fabric_strategy \
	tests/test_fabric_sustain_ddp.py::test_fabric_two_ranks_per_rank_accounting_and_summary \
	tests/test_budget_energy_core.py

$(COMPAT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip
	$(COMPAT_PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(COMPAT_PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Each version in turn in the same venv (only lightning changes); a summary line per
# version, and a non-zero exit when any failed.
test-compat: $(COMPAT_VENV)/.installed
	@failed=""; for spec in $(COMPAT_LIGHTNING); do \
		echo "== $$spec"; \
		$(COMPAT_PY) -m pip install --quiet --upgrade "$$spec" "$(TORCH_SPEC)" || { failed="$$failed [$$spec: install]"; continue; }; \
		version=$$($(COMPAT_PY) -c "import lightning, torch; print(f'lightning {lightning.__version__}, torch {torch.__version__}')"); \
		echo "== $$version"; \
		if PYTHONPATH=$(CURDIR) $(COMPAT_PY) -m pytest -q -p no:cacheprovider $(COMPAT_TESTS); then \
			echo "== PASSED: $$version"; \
		else failed="$$failed [$$version]"; echo "== FAILED: $$version"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "test-compat failed for:$$failed"; exit 1; fi; \
	echo "test-compat passed for $(COMPAT_LIGHTNING)"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lightning_sustain tests benchmarks examples

clean:
	rm -rf $(VENV) $(COMPAT_VENV) demo_output lightning_logs .pytest_cache
