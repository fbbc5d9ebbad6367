#!/usr/bin/env bash
# Set up and run the whole test suite: lint, types, then pytest on both cores.
# In CI (CI=true) a test that needs a missing tool fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest -n 2 --dist loadgroup -p no:cacheprovider -rfEs "$@"
