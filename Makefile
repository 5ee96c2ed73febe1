# The two commands a newcomer runs (see README): `make demo` and `make test`.
# Both first run `make setup`: a project-local virtual environment .venv/ made from $(PYTHON)
# (the system python3 by default; scripts/setup_env.sh says why and what it installs).
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/quick
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast

setup:
	@PYTHON="$(PYTHON)" VENV="$(VENV)" sh scripts/setup_env.sh

demo: setup
	$(PY) experiments/run.py --flagfile=experiments/quick.flags --workdir=$(WORKDIR)

# pytest exits 5 when it collects nothing: say so and fail, rather than pass silently.
test: setup
	@rc=0; $(PY) -m pytest -q -ra --durations=15 tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests
