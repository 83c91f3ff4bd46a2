#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine, then runs linters, types and the suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k outage`).
set -euo pipefail
cd "$(dirname "$0")/.."

# promtool and amtool (and the real Prometheus and Alertmanager) come from Debian.
if ! command -v promtool >/dev/null || ! command -v amtool >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "test: promtool/amtool missing; install Debian's prometheus and prometheus-alertmanager" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus prometheus-alertmanager >/dev/null
fi

bash scripts/setup.sh --dev

echo "== ruff" && .venv/bin/ruff check exporter tests demo bench alerts grafana deploy
echo "== ruff format" && .venv/bin/ruff format --check exporter tests demo bench alerts grafana deploy
echo "== mypy --strict" && .venv/bin/mypy exporter tests
echo "== pytest"
# pytest exits 5 when no test ran; `set -e` turns that, like any failure, into a failed run.
.venv/bin/python -m pytest "$@"
