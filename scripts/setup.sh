#!/usr/bin/env bash
# Create .venv and install the package with its dev tools; re-install only when pyproject.toml changed.
# Sourced by scripts/demo.sh and scripts/test.sh, or run on its own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${PYTHON:-}" ]; then
  PYTHON=$(command -v python3.11 || command -v python3 || true)
fi
if [ -z "$PYTHON" ]; then
  echo "Error: no python3 found; install Python 3.11 and run again" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.inco-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "Installing into .venv (torch 2.14.1, torchvision 0.29.1, Ray, FastAPI, ...); the first time takes a few minutes" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  # --no-compile: Python compiles the modules it imports when it first imports them, not the ~20,000
  # files of torch and Ray at install time (a minute less on 2 cores)
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' >&2 || true
  .venv/bin/python -c 'import torch, torchvision, inco_core, cli.main' || {
    echo "Error: the install into .venv failed; see the pip output above" >&2
    exit 1
  }
  touch "$stamp"
fi
