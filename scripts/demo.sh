#!/usr/bin/env bash
# The main job end to end on embedded defaults: install into .venv, start the local stack (SQLite,
# a local Redis, a local Ray, the API and one worker), submit an InCo experiment at 1:16, follow it
# to the end, print the leaderboard, stop the stack. PRESET=cpu runs the reduced real experiment
# (about 30 minutes on 2 cores); the default smoke preset takes about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export INCO_HOME="${INCO_HOME:-$HOME/.inco}"
export INCO_DATA="${INCO_DATA:-$(cd .. && pwd)/shared/datasets/neu-cls}"
PORT="${INCO_PORT:-8000}"
export INCO_API_URL="http://127.0.0.1:$PORT"
INCO=.venv/bin/inco
$INCO up --port "$PORT" --data "$INCO_DATA"
trap '$INCO down' EXIT
$INCO submit --method inco --ratio 1:16 --eval finetune --preset "${PRESET:-smoke}" --wait "$@"
$INCO results
