#!/usr/bin/env bash
# GPU checks for a session lent a device machine (one call, see the device tool's README).
#
# Prepare here, on the CPU machine, once per session (nothing below is committed):
#   bash bench/gpu_check.sh --prepare      # cp312 wheels of pydantic & co into .whl/, images into .data/
# Then call the device tool once, carrying both folders:
#   run(command="OUT=$OUT bash bench/gpu_check.sh", carry=[".whl", ".data"], timeout_s=540)
# and commit what comes back under bench/results/ with the card named.
#
# On the device machine (Python 3.12 with its own torch, torchvision, pillow, rich, typer, pytest,
# no pydantic): installs the carried wheels, runs the CUDA tests, the throughput benchmark on cuda,
# then as much of the `paper` preset InCo run as PAPER_SECONDS allows.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
  grep -qx '/.data/' .git/info/exclude || echo '/.data/' >> .git/info/exclude
  rm -rf .whl && mkdir -p .whl .data
  py() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
  for pkg in pydantic pydantic-core annotated-types typing-inspection; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "$pkg==$(py "$pkg")"
  done
  cp -r ../shared/datasets/neu-cls .data/
  du -sh .whl .data
  exit 0
fi

OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 INCO_TEST_DATA=$PWD/.data/neu-cls
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

python3 -m pytest -q -p no:cacheprovider -m gpu tests/inco_core 2>&1 | tee "$OUT/gpu-tests.txt"
python3 bench/throughput.py --device cuda --size 200 --batch 64 --views 5 --steps 10 --rounds 3 --out "$OUT" 2>&1 | tail -n 15
python3 bench/throughput.py --device cuda --size 64 --batch 64 --views 5 --steps 20 --rounds 3 --out "$OUT/64px" 2>&1 | tail -n 3

# The paper preset, cut to the time left: pretraining epochs scale T1/T2 (0.15 and 0.75 of the run).
timeout "${PAPER_SECONDS:-240}" python3 - "$OUT" <<'PY' 2>&1 | tail -n 40
import json, sys, time
from pathlib import Path
from bench.table1 import PrintReporter
from inco_core.config import load_spec
from inco_core.experiment import Experiment

out = Path(sys.argv[1])
epochs = int(__import__("os").environ.get("PAPER_EPOCHS", "20"))
spec = load_spec({"method": "inco", "data": {"path": ".data/neu-cls"}, "ratios": ["1:32", "1:2"],
                  "evals": ["finetune", "linear"], "preset": "paper",
                  "overrides": {"pretrain.epochs": epochs, "finetune.epochs": 100, "linear.epochs": 200}})
t0 = time.time()
result = Experiment(spec, run_dir=Path("/tmp/paper-run"), reporter=PrintReporter()).run()
result["note"] = f"paper preset with pretrain.epochs={epochs}; wall {time.time() - t0:.0f} s"
(out / "paper-inco.json").write_text(json.dumps({k: v for k, v in result.items() if k != "pretraining"}, indent=1))
for row in result["results"]:
    print(row["ratio"], row["eval"], round(100 * row["accuracy"], 2))
PY
ls -la "$OUT"
