#!/usr/bin/env bash
# Idempotent setup: Python venv with the project and its dev tools, and the Kafka broker jars.
# Re-running it does nothing when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found (need Python 3.11+)" >&2; exit 1; }
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "setup: Python 3.11+ required, found $("$PYTHON" --version)" >&2; exit 1; }

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  # (a venv without pip: what a failed creation leaves, e.g. Debian without python3-venv)
  echo "setup: creating .venv"
  rm -rf .venv
  "$PYTHON" -m venv .venv || {
    rm -rf .venv
    echo "setup: '$PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
    exit 1
  }
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing the project and dev dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

infra/kafka/kafka.sh fetch

# Debian tools some checks need, installed where we can: PACKAGE, what needs it, what happens without.
debian_tool() {
  local package=$1 purpose=$2 without=$3
  local failed=".venv/.apt-failed-$package"  # tried once: not again on every run
  command -v "$package" >/dev/null 2>&1 && return 0
  if [ -f "$failed" ]; then
    echo "setup: $package not installed (it failed before; rm $failed to try again); $without" >&2
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's $package for $purpose"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null \
      || { touch "$failed"; echo "setup: could not install $package; $without" >&2; }
  else
    echo "setup: $package not found (apt-get install $package); $without" >&2
  fi
}
# The dashboard's browser test drives Chromium headless; the enforcement benchmark drives the
# nodes with hey, an HTTP load generator.
debian_tool chromium "the dashboard browser test" "the browser test will be skipped"
debian_tool hey "the enforcement benchmark" "bench/enforcement.py will not run"
