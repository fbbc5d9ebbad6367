#!/usr/bin/env bash
# Prepare a virtual environment with mailfort and its pinned dependencies.
# Usage: scripts/setup.sh [--test]   (--test also installs the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {
  # Install the Debian packages that are missing; without root, say what is missing.
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "setup: not a Debian system; install these yourself: ${missing[*]}" >&2
    return 0
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || {
    echo "setup: cannot run apt-get (not root, no sudo); tests needing ${missing[*]} will skip" >&2
    return 0
  }
  # Postfix is a test peer run from private configs: keep Debian from configuring a system MTA.
  echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections 2>/dev/null || true
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "setup: mailfort needs Python 3.11 or newer as '$PY'" >&2
  exit 1
fi
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
  apt_install python3-venv
fi

if [ "$want_test" = 1 ]; then
  # Real counterparts the tests talk to (see tests/ and docs/testing.md).
  mapfile -t pkgs < <(grep -v '^\s*#' scripts/debian-test-packages.txt | grep -v '^\s*$')
  [ ${#pkgs[@]} -gt 0 ] && apt_install "${pkgs[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.mailfort-installed
if [ ! -f "$stamp" ] || [ requirements.lock -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  touch "$stamp"
fi
