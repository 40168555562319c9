#!/usr/bin/env bash
# The test command: installs everything into .venv, starts local services if down, runs pytest in
# INCO_TEST_PROCESSES processes (default 2; 0 runs in this one), each taking whole test files, the
# long service files in two lanes first (tests/conftest.py).
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
bash scripts/services.sh
# the browser tests (tests/web/test_browser.py) drive Chromium through chromedriver (Debian packages)
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "installing chromium and chromium-driver for the browser tests" >&2
  sudo=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then sudo="sudo -n"; fi
  if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1; then
    echo "warning: apt-get could not install chromium and chromium-driver; the other tests run, the browser tests" \
      "fail until they are installed (apt-get install -y chromium chromium-driver)" >&2
  fi
fi
export INCO_TEST_DATA="${INCO_TEST_DATA:-$(cd .. && pwd)/shared/datasets/neu-cls}"
set +e
.venv/bin/python -m pytest -p no:cacheprovider -n "${INCO_TEST_PROCESSES:-2}" --dist loadfile --no-loadscope-reorder "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "Error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
