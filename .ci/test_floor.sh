#!/usr/bin/env bash
# CI: the fast tests on the oldest TensorFlow and Keras that setup.cfg allows
# (requirements-floor.txt), so a change that needs a newer API fails here instead of for users.
#
# The venv is cached under ${XDG_CACHE_HOME:-$HOME/.cache}/keras_ncssl-ci/, keyed by a hash of
# requirements-floor.txt and the Python version; a changed file builds a new one and removes
# the old. The package itself is installed editable with --no-deps, so the tests run this
# checkout's code against exactly the floor's dependencies.
#
# Usage: bash .ci/test_floor.sh [pytest arguments; default: tests]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
started=$(date +%s)

python=/usr/bin/python3
[ -x "$python" ] || python=$(command -v python3)
key=$( (cat requirements-floor.txt; "$python" --version 2>&1) | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/keras_ncssl-ci
venv=$cache/floor-$key

if [ ! -f "$venv/.complete" ]; then
  echo "floor venv: building $venv from requirements-floor.txt"
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements-floor.txt
  "$venv/bin/python" -m pip check
  touch "$venv/.complete"
  # Earlier floors' venvs are of no further use.
  find "$cache" -maxdepth 1 -name 'floor-*' ! -name "floor-$key" -exec rm -rf {} +
else
  echo "floor venv: reusing $venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
"$venv/bin/python" -c 'import importlib.metadata as m; print("floor:", ", ".join(
    f"{p} {m.version(p)}" for p in ("tensorflow-cpu", "keras", "tensorflow-datasets", "numpy", "protobuf")))'

# pytest exits 5 when it collects nothing: say so and fail, rather than pass silently.
rc=0
"$venv/bin/python" -m pytest -q -ra -p no:cacheprovider -m "not slow" "${@:-tests}" || rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests on the floor (exit 5)"; fi
echo "floor tests: $(( $(date +%s) - started )) s in all"
exit $rc
