# The two commands of the README's quick start: `make demo` and `make test`.
# Each installs what it needs first (scripts/bootstrap is idempotent).
.PHONY: demo test lint typecheck unit fuzz bench bootstrap clean

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

# Two workers: the suite is mostly end-to-end tests waiting on real outages and timers, and
# it passed on two workers on this 2-core machine with a busy loop taking a core beside it.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
unit: bootstrap
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The protocol parser under coverage-guided fuzzing (atheris) for a bounded time; CI runs
# FUZZ_SECONDS of it in every `make test`, `make fuzz FUZZ_SECONDS=600` digs deeper.
FUZZ_SECONDS ?= 20
fuzz: bootstrap
	@rm -rf .fuzz-corpus && $(PY) fuzz/fuzz_protocol.py --write-seeds .fuzz-corpus >/dev/null
	@$(PY) fuzz/fuzz_protocol.py .fuzz-corpus -max_total_time=$(FUZZ_SECONDS) \
		-print_final_stats=1 > .fuzz-corpus/log 2>&1; status=$$?; \
		grep -E "stat::(number_of_executed_units|new_units_added)|ERROR|Traceback" .fuzz-corpus/log; \
		[ $$status -eq 0 ] || tail -40 .fuzz-corpus/log; exit $$status

test: lint typecheck unit fuzz

bench: bootstrap
	$(VENV)/bin/avd bench --quick

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

.PHONY: soak peers
soak: bootstrap
	$(PY) -m tests.soak

# avd beside imagezmq and vidgear's NetGear, same frames, same run (about 4 minutes).
peers: bootstrap
	$(PY) -m tests.peers
