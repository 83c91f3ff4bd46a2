#!/usr/bin/env bash
# Creates the two virtual environments the project uses, idempotently:
#   .venv                  the exporter with prefect-client only (+ dev tools with --dev)
#   .venv-prefect-server   a full Prefect (server and process worker) for the demo and tests
#   ~/.cache/prefect-exporter/  with --dev: the older Prefect servers and the oldest prefect-client
#                               of the compatibility matrix (scripts/servers.py), kept between runs
# Set PREFECT_VERSION to pin the server's version (default: the newest 3.x).
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1
quiet() { grep -v "^WARNING: Location" || true; }
python=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if [ "$dev" = 1 ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | quiet
else
  .venv/bin/pip install -q --disable-pip-version-check -e . 2>&1 | quiet
fi

if [ ! -x .venv-prefect-server/bin/prefect ]; then
  "$python" -m venv .venv-prefect-server
  .venv-prefect-server/bin/pip install -q --disable-pip-version-check \
    "prefect${PREFECT_VERSION:+==$PREFECT_VERSION}" 2>&1 | quiet
  [ -x .venv-prefect-server/bin/prefect ] || { echo "setup: installing prefect failed" >&2; exit 1; }
fi

if [ "$dev" = 1 ]; then
  # The compatibility matrix's environments, outside the repository (a minute or two each the
  # first time, nothing after): tests/test_integration_compat.py runs against them.
  "$python" scripts/servers.py
fi
