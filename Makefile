# K2: `make demo` sets everything up and opens the Dagster UI; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py k2_assets/core/vendor_scan.c k2_assets/core/kafka_batch.c k2_assets/core/kafka_batch_build.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: install
	$(BIN)/k2 demo

.tools/promtool:
	bash scripts/get-promtool || echo "warning: promtool unavailable; the alert-rule tests will say why they fail"

.tools/pushgateway:
	bash scripts/get-pushgateway || echo "warning: pushgateway unavailable; the Pushgateway tests will say why they fail"

.PHONY: docker-compose
docker-compose:  # Debian's docker-compose: `docker-compose config` validates the stack without a Docker engine
	@bash scripts/get-docker-compose || echo "warning: docker-compose unavailable; the compose tests will say why they fail"

/usr/bin/chromium:  # Debian's chromium for the browser test (Playwright drives it; it never downloads a browser)
	bash scripts/get-chromium || echo "warning: chromium unavailable; the browser test will say why it fails"

.PHONY: postgresql
postgresql:  # Debian's PostgreSQL server: the tests of the production catalog start it in a temporary directory
	@bash scripts/get-postgresql || echo "warning: postgresql unavailable; the PostgreSQL catalog tests will say why they fail"

test: install /usr/bin/chromium .tools/promtool .tools/pushgateway docker-compose postgresql
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 -q

bench: install
	$(BIN)/python -m bench
