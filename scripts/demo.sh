#!/usr/bin/env bash
# The main job end to end: install into .venv, pretrain InCo on NEU-CLS, fine-tune and linearly
# evaluate at 1:32 and 1:2, print the results table. PRESET=cpu for the reduced real run (~30 min
# on 2 cores); the default smoke preset finishes in about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export INCO_HOME="${INCO_HOME:-$HOME/.inco}"
DATA="${INCO_DATA:-$(cd .. && pwd)/shared/datasets/neu-cls}"
exec .venv/bin/inco run --method inco --ratio 1:32 --ratio 1:2 --eval both \
  --preset "${PRESET:-smoke}" --data "$DATA" "$@"
