# K2: `make demo` sets everything up and opens the Dagster UI; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: install
	$(BIN)/k2 demo

.tools/promtool:
	bash scripts/get-promtool || echo "warning: promtool unavailable; the alert-rule tests will say why they fail"

test: install .tools/promtool
	$(BIN)/python -m pytest -n 2 -q

bench: install
	$(BIN)/python -m bench
