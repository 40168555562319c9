#!/usr/bin/env bash
# The main job end to end on embedded defaults: install into .venv, start the local stack (SQLite,
# a local Redis, a local Ray, the API and one worker), submit an InCo experiment at 1:16, follow it
# to the end, print the leaderboard, and leave the stack running for the web page it prints the
# address of (`inco down` stops it; STOP=1 stops it at the end; a failure stops it). By default the cpu preset is cut to 3
# pretraining epochs on 512 images (a couple of minutes on 2 cores); PRESET=cpu runs the reduced
# real experiment (about 30 minutes), PRESET=smoke the seconds-long test run (chance accuracy).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export INCO_HOME="${INCO_HOME:-$HOME/.inco}"
export INCO_DATA="${INCO_DATA:-$(cd .. && pwd)/shared/datasets/neu-cls}"
PORT="${INCO_PORT:-8000}"
export INCO_API_URL="http://127.0.0.1:$PORT"
INCO=.venv/bin/inco
$INCO up --port "$PORT" --data "$INCO_DATA"
trap '$INCO down' EXIT  # on failure; the stack stays up after a run that succeeded
if [ -n "${PRESET:-}" ]; then
  RUN=(--preset "$PRESET")
else
  RUN=(--preset cpu --set pretrain.epochs=3 --set pretrain.max_images=512)
fi
case " $* " in  # a preset given on the command line replaces ours (an option given twice is an error)
  *" --preset "* | *" --preset="*) RUN=() ;;
esac
$INCO submit --method inco --ratio 1:16 --eval finetune "${RUN[@]}" --wait "$@"
$INCO results
if [ "${STOP:-0}" = 1 ]; then
  exit 0  # the trap stops the stack
fi
trap - EXIT
JOB=$($INCO jobs --json | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])')
echo
echo "The web page (leaderboard, jobs, plots, models, predict): http://127.0.0.1:$PORT/"
echo "  open it in a browser and sign in with the local token, which this prints: cat $INCO_HOME/token"
echo "  the same pictures as files: $INCO plot $JOB --out plots/   and   $INCO results --plot fig4.png"
echo "  stop the stack with: $INCO down"
