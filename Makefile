# The two commands on the README's first screen: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Azurite (the Azure Blob emulator the storage tests run) comes from the npm registry.
AZURITE_VERSION := 3.35.0
AZURITE := .work/node_modules/.bin/azurite-blob
# The report's browser test drives Debian's Chromium through Debian's chromedriver (apt, as root or with sudo).
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: install browser lint typecheck unit test-distributed test demo clean

$(AZURITE):
	npm install --prefix .work --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VERSION)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Installed only when missing; tests/integration/test_report_browser.py fails without them.
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium chromium-driver; }

lint: install
	$(BIN)/ruff check src tests dags benchmarks scripts

typecheck: install
	$(BIN)/mypy

unit: install $(AZURITE) browser
	$(BIN)/pytest -m "not distributed"

# The deployment tier alone: PostgreSQL and Redis from wheels, Airflow's CeleryExecutor with two
# workers, a worker killed mid-run, the shared rate limit (tests/system/test_distributed.py, docs/deploy.md).
test-distributed: install
	$(BIN)/pytest -m distributed

# Everything in one pytest session: the unit tests and the deployment tier.
test: lint typecheck install $(AZURITE) browser
	$(BIN)/pytest

demo: install
	$(BIN)/python scripts/demo.py

clean:
	rm -rf .work
