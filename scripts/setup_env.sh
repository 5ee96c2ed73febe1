#!/bin/sh
# `make setup`: a project-local virtual environment with everything installed, on a stock machine.
#
# Debian 12 and current Ubuntu mark the system python3 "externally managed" (PEP 668): pip refuses
# to install into it. So everything goes into $VENV (default .venv/, git-ignored), made from
# $PYTHON (default python3). Debian ships `venv` without ensurepip unless python3-venv is
# installed: we install it with apt when we can (root, or sudo without a password) and otherwise
# print the one command to run. A second run is fast: nothing is reinstalled while
# requirements.txt, setup.cfg and the interpreter are unchanged (a stamp file records them).
#
# Environment: PYTHON (interpreter to build the venv from), VENV (its directory),
# APT_GET (apt-get command; set to "" to never use apt).
set -eu
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
APT_GET=${APT_GET-apt-get}
cd "$(dirname "$0")/.."

say() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

# Run an apt-get command as root when possible; print nothing and fail otherwise.
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n "$@"; else return 1; fi
}
apt_install() {  # apt_install PACKAGE...: 0 if installed now
    [ -n "$APT_GET" ] && command -v "$APT_GET" >/dev/null 2>&1 || return 1
    as_root "$APT_GET" install -y -qq "$@" >/dev/null 2>&1 && return 0
    as_root "$APT_GET" update -qq >/dev/null 2>&1 && as_root "$APT_GET" install -y -qq "$@" >/dev/null 2>&1
}

# -- the default real data set: Debian's Fashion-MNIST package --------------------------------
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -d "$FMNIST" ] && [ -n "$APT_GET" ] && command -v "$APT_GET" >/dev/null 2>&1; then
    say "installing Debian's dataset-fashion-mnist (the default data set) ..."
    apt_install dataset-fashion-mnist || say "WARNING: could not install dataset-fashion-mnist (run:" \
        "sudo apt-get install dataset-fashion-mnist); see README 'Data' for other ways to provide it."
fi

# -- the interpreter -------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found; install Python >= 3.10 or run: make setup PYTHON=/path/to/python3"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "PYTHON=$PYTHON is Python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'); keras_ncssl needs >= 3.10: run make setup PYTHON=python3.11 (or another >= 3.10)"
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYEXE=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')

# -- the virtual environment -----------------------------------------------------------------
STAMP="$VENV/.keras_ncssl-setup"
hash256() { if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi; }
WANT=$(cat requirements.txt setup.cfg | hash256 | cut -c1-16)" $PYEXE"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    say "$VENV is up to date (delete it to rebuild)."
    exit 0
fi
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "${WANT#* }" != "$(cut -d' ' -f2- "$STAMP")" ]; then
    say "$VENV was made from another interpreter; rebuilding it from $PYEXE ..."
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        say "$PYTHON has no venv/ensurepip (Debian ships them in python$PYVER-venv); installing it ..."
        apt_install "python$PYVER-venv" || apt_install python3-venv \
            || die "$PYTHON cannot create virtual environments. Run: sudo apt-get install python$PYVER-venv   then: make setup"
    fi
    rm -rf "$VENV"
    say "creating $VENV from $PYEXE (Python $PYVER) ..."
    "$PYTHON" -m venv "$VENV" || { rm -rf "$VENV"; die "$PYTHON -m venv $VENV failed (see above)"; }
fi
say "installing requirements.txt into $VENV (a few minutes the first time) ..."
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
echo "$WANT" > "$STAMP"
say "done. Use the environment as $VENV/bin/python (e.g. $VENV/bin/python experiments/run.py --help)."
