#!/usr/bin/env bash
# Set up and run mailfort on loopback with a demo domain and user (data in ./var).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/mailfort dev "$@"
