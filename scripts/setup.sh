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

# uv installs what pip would, from the indexes, links and constraints of pip's own settings (pip config
# list: files and PIP_* variables), in about 15 s instead of a minute on 2 cores; pip does when uv fails
install_with_uv() {
  .venv/bin/python -m pip install --quiet --disable-pip-version-check uv >/dev/null 2>&1 || return 1
  local args=() key value v
  while IFS='=' read -r key value; do
    value=${value#\'}
    value=${value%\'}
    case "${key##*.}" in
      index-url) args+=(--index-url "$value") ;;
      extra-index-url) for v in $value; do args+=(--extra-index-url "$v"); done ;;
      find-links) for v in $value; do args+=(--find-links "$v"); done ;;
      constraint) for v in $value; do args+=(--constraint "$v"); done ;;
    esac
  done < <(.venv/bin/python -m pip config list 2>/dev/null)
  # the same package may sit on several of those indexes: take the best version from any of them, as pip does
  .venv/bin/uv pip install --quiet --python .venv/bin/python --index-strategy unsafe-best-match "${args[@]}" -e '.[dev]'
}

if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "Installing into .venv (torch 2.14.1, torchvision 0.29.1, Ray, FastAPI, ...); the first time takes a few minutes" >&2
  if ! install_with_uv; then
    echo "uv could not install; installing with pip" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
    # --no-compile: Python compiles the modules it imports when it first imports them, not the ~20,000
    # files of torch and Ray at install time (a minute less on 2 cores)
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' >&2 || true
  fi
  .venv/bin/python -c 'import torch, torchvision, inco_core, cli.main' || {
    echo "Error: the install into .venv failed; see the pip output above" >&2
    exit 1
  }
  touch "$stamp"
fi
