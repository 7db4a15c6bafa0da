# The two commands of the README's quick start: `make demo` and `make test`.
# Each installs what it needs first (scripts/bootstrap is idempotent).
.PHONY: demo test lint typecheck unit bootstrap clean

VENV := .venv
PY := $(VENV)/bin/python

bootstrap:
	@scripts/bootstrap

demo: bootstrap
	@$(PY) -m avd.demo

lint: bootstrap
	$(VENV)/bin/ruff check avd tests
	$(VENV)/bin/ruff format --check avd tests

typecheck: bootstrap
	$(VENV)/bin/mypy

unit: bootstrap
	$(PY) -m pytest -q

test: lint typecheck unit

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
