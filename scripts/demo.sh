#!/usr/bin/env bash
# Set up the gateway in .venv and run the demo: a local Azure OpenAI simulator and
# the gateway in front of it, on loopback, with a fresh demo key. No Azure account needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt .
exec .venv/bin/gateway demo "$@"
