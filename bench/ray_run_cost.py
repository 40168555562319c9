"""What Ray's own processes cost: a local Ray head's start, and a training run's helpers.

Measures the whole machine's CPU (/proc/stat, so run it alone) for:

- starting a local Ray head (``start_local_ray``) without the Ray dashboard, as ``inco worker`` and
  ``inco up`` start it, and with it (``INCO_RAY_DASHBOARD=1``);
- ``--runs`` trivial Ray Train runs on one worker (three reports with a checkpoint each, ``--step``
  seconds apart): with Ray's own ``TorchTrainer`` (its placement-group cleaner, metrics and Datasets
  manager; no preemption watcher, as on the heads ``inco worker`` starts) and with the service's
  ``worker.training.Trainer``, which starts none of them.

    .venv/bin/python bench/ray_run_cost.py --runs 3 --out bench/results/ray-run-cost.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine_cpu_s() -> float:
    """CPU-seconds the whole machine spent so far (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def loop(config: dict) -> None:
    """Three reports, each with a checkpoint, ``step`` seconds apart: Ray's cost, not training's."""
    import ray.train

    for epoch in range(3):
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "state.json").write_text(json.dumps({"epoch": epoch}))
            ray.train.report({"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(folder))
        time.sleep(config["step"])


def head_cost(dashboard: bool, settle_s: float) -> tuple[float, float]:
    """CPU-seconds and seconds to start a head (and to keep it ``settle_s`` while its processes settle)."""
    from worker.main import start_local_ray, stop_local_ray

    home = Path(tempfile.mkdtemp(prefix="ray-cost-"))
    c0, t0 = machine_cpu_s(), time.monotonic()
    proc, _ = start_local_ray(home, dashboard=dashboard)
    took = time.monotonic() - t0
    time.sleep(settle_s)
    cpu = machine_cpu_s() - c0
    stop_local_ray(proc)
    return cpu, took


def run_costs(home: Path, runs: int, step: float) -> dict[str, list[tuple[float, float]]]:
    """CPU-seconds and seconds of each trivial run: Ray's ``TorchTrainer`` on a head with the dashboard
    (its placement-group cleaner asks the dashboard), the service's ``Trainer`` on one without."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from worker.main import start_local_ray, stop_local_ray
    from worker.training import Trainer

    out: dict[str, list[tuple[float, float]]] = {}
    for name, cls, dashboard in (
        ("Ray's TorchTrainer, head with the dashboard", TorchTrainer, True),
        ("the service's Trainer, head without", Trainer, False),
    ):
        proc, address = start_local_ray(home, dashboard=dashboard)
        os.environ["RAY_ADDRESS"] = address
        out[name] = []
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            time.sleep(10)  # the head's own start settles
            for i in range(runs):
                c0, t0 = machine_cpu_s(), time.monotonic()
                cls(
                    loop,
                    train_loop_config={"step": step},
                    scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                    run_config=RunConfig(
                        name=f"{cls.__name__}-{i}",
                        storage_path=str(home / "runs"),
                        failure_config=FailureConfig(max_failures=0),
                    ),
                ).fit()
                time.sleep(5)  # the run's actors exit
                out[name].append((machine_cpu_s() - c0, time.monotonic() - t0))
                print(f"{name}, run {i + 1}: {out[name][-1][0]:.1f} CPU-s, {out[name][-1][1]:.1f} s", flush=True)
        finally:
            ray.shutdown()
            stop_local_ray(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="trivial runs per trainer")
    ap.add_argument("--step", type=float, default=1.0, help="seconds between a run's reports")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds a head is kept after its start")
    ap.add_argument("--out", type=Path, help="write the report (Markdown) here")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as on the heads `inco worker` starts
    from worker.main import ray_env

    # the heads' token, before Ray is imported: Ray reads its authentication mode once per process
    home = Path(tempfile.mkdtemp(prefix="ray-cost-"))
    os.environ.update(ray_env(home))
    heads = {label: head_cost(dash, args.settle) for label, dash in (("without", False), ("with", True))}
    for label, (cpu, took) in heads.items():
        print(f"head {label} dashboard: {cpu:.1f} CPU-s ({took:.1f} s to start)", flush=True)
    costs = run_costs(home, args.runs, args.step)
    lines = [
        "# What Ray's own processes cost",
        "",
        f"`{' '.join(['python', *sys.argv])}` on {platform.node() or 'this machine'} ({os.cpu_count()} cores), "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; the whole machine's CPU (/proc/stat), nothing else running.",
        "",
        "| what | CPU-s | seconds |",
        "|---|---|---|",
    ]
    for label, (cpu, took) in heads.items():
        lines.append(
            f"| a local Ray head {label} the dashboard (start + {args.settle:.0f} s) | {cpu:.1f} | {took:.1f} |"
        )
    for name, rows in costs.items():
        cpu = statistics.median(c for c, _ in rows)
        took = statistics.median(t for _, t in rows)
        lines.append(f"| a trivial one-worker run, {name} (median of {len(rows)}) | {cpu:.1f} | {took:.1f} |")
    lines += [
        "",
        f"A trivial run: three reports with a checkpoint each, {args.step:g} s apart, then 5 s for its actors "
        "to exit. Ray's `TorchTrainer` starts its placement-group cleaner (a detached actor polling every "
        "second), its metrics callbacks and its Datasets manager; the service's `Trainer` none of them.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
