#!/usr/bin/env bash
# One command for a self-contained demo: sets up both environments, starts a local Prefect
# server, a worker, a burst of runs and the exporter, and prints where /metrics is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m demo "$@"
