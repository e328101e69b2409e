#!/usr/bin/env bash
# Set up everything the test suite needs and run it: lint, types, tests.
# Works on a fresh machine: creates .venv, installs the package with its test
# extras, installs redis-server when absent (as root, via apt-get), then runs
# ruff, mypy --strict and pytest. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
# The runtime dependencies at the versions the image uses (constraints.txt, scripts/lock.sh).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server (apt-get)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing; install it (e.g. apt-get install redis-server)" >&2
    exit 1
  fi
fi

echo "== ruff"
.venv/bin/ruff check gateway tests bench
.venv/bin/ruff format --check gateway tests bench
echo "== mypy --strict gateway"
.venv/bin/mypy gateway
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
