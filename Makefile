# The two commands a newcomer runs (see README): `make demo` and `make test`.
PYTHON ?= python3
WORKDIR ?= runs/quick

.PHONY: setup demo test test-fast bench

# Debian's Fashion-MNIST package is the default real data set; elsewhere see README.
setup:
	@if command -v apt-get >/dev/null 2>&1 && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  echo "WARNING: could not apt-get install dataset-fashion-mnist; see README 'Data'"; fi
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -e .

demo: setup
	$(PYTHON) experiments/run.py --flagfile=experiments/quick.flags --workdir=$(WORKDIR)

# pytest exits 5 when it collects nothing: say so and fail, rather than pass silently.
test: setup
	@rc=0; $(PYTHON) -m pytest -q -ra --durations=15 tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; fi; exit $$rc

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" tests
