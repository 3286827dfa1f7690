# The two quick-start commands: `make demo` (train + test on the synthetic motion dataset) and
# `make test` (lint + test suite). Both create .venv on first use via scripts/setup_env.sh.
# `make test-fast` is the edit loop: the suite without the slow and gpu tests, no lint.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/demo_fcf_synthetic.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	@touch $@

demo: setup
	$(VENV)/bin/vmm demo --config $(DEMO_CONFIG)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -X warn_default_encoding -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -X warn_default_encoding -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache lightning_logs
