"""Data-parallel scaling of pretraining: images/s with 1, 2, ... Ray Train workers.

Each setting runs ``inco_core.train.pretrain`` inside a Ray Train ``TorchTrainer`` (gloo on CPU,
nccl on GPU), exactly as a job does, for ``--epochs`` epochs on ``--images`` NEU-CLS images at the
preset's input size, and times the epochs after the first (warm-up). On CPU the machine's cores
are split evenly between the workers; with ``--gpus N`` the worker counts are 1..N, one GPU each.

    .venv/bin/python bench/scaling.py --workers 1 2                 # this machine, CPU
    .venv/bin/python bench/scaling.py --gpus 4 --preset paper       # a GPU host or Ray cluster

Uses RAY_ADDRESS when set, else starts a local Ray. Writes ``bench/results/scaling-<device>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_fn(config: dict) -> None:
    import ray
    import ray.train
    import torch

    from inco_core.config import RunSpec
    from inco_core.data import load_images
    from inco_core.device import prepare_model, select_device
    from inco_core.distributed import world
    from inco_core.methods import build_method
    from inco_core.progress import NullReporter
    from inco_core.train import pretrain

    spec = RunSpec.model_validate(config["spec"])
    cfg = spec.resolve()
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
    torch.set_num_threads(max(1, cpus))
    device = select_device(spec.resources.device)
    rank, world_size = world()
    ds = load_images(spec.data.path, cfg.image_size, cache_dir=Path(config["cache"]))
    images = ds.images[: config["images"]].to(device)
    torch.manual_seed(0)
    method = prepare_model(build_method(spec.method, cfg.pretrain), device)
    times: list[float] = []

    class Clock(NullReporter):
        def __init__(self) -> None:
            self.t = time.perf_counter()

        def epoch_end(self, log) -> None:
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

    pretrain(method, images, cfg.pretrain, seed=0, device=device, reporter=Clock(), rank=rank, world_size=world_size)
    if rank == 0:
        steady = times[1:] or times
        per_epoch = sum(steady) / len(steady)
        views = len(images) * method.num_views
        Path(config["out"]).write_text(json.dumps({"epoch_s": per_epoch, "img_per_s": views / per_epoch}))


def run(workers: int, gpus: bool, args: argparse.Namespace, total_cpus: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    overrides = {"pretrain.epochs": args.epochs, "pretrain.knn_every": 0, "pretrain.batch_size": args.batch_size}
    spec = {
        "method": args.method,
        "data": {"path": str(args.data)},
        "preset": args.preset,
        "overrides": overrides,
        "resources": {"device": "cuda" if gpus else "cpu", "workers": workers},
    }
    out = Path(tempfile.mkdtemp()) / "result.json"
    per_worker = {"CPU": max(1, total_cpus // workers)} if not gpus else {"CPU": 1, "GPU": 1}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"spec": spec, "images": args.images, "out": str(out), "cache": str(args.cache)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus, resources_per_worker=per_worker),
        run_config=RunConfig(name=f"scaling-{workers}", storage_path=tempfile.mkdtemp()),
    )
    t0 = time.perf_counter()
    trainer.fit()
    result = json.loads(out.read_text())
    return {"workers": workers, **result, "wall_s": time.perf_counter() - t0, "per_worker": per_worker}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="CPU worker counts")
    ap.add_argument("--gpus", type=int, default=0, help="use GPUs: worker counts 1..N, one GPU each")
    ap.add_argument("--method", default="inco")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "neu-cls")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "inco-bench-cache")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from worker.main import ray_env, start_local_ray, stop_local_ray

    head = None
    if not os.environ.get("RAY_ADDRESS"):  # a Ray head of our own (ray.init() may find a stale cluster)
        home = Path(tempfile.mkdtemp(prefix="inco-scaling-"))
        head, address = start_local_ray(home)
        os.environ.update({**ray_env(home), "RAY_ADDRESS": address})
    import ray  # after the token settings are in the environment: Ray reads them when it loads

    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
    try:
        rows = measure(args)
    finally:
        ray.shutdown()
        if head is not None:
            stop_local_ray(head, grace_s=10)
    report(args, rows)


def measure(args: argparse.Namespace) -> list[dict]:
    import ray

    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    counts = list(range(1, args.gpus + 1)) if args.gpus else args.workers
    rows = []
    for w in counts:
        row = run(w, bool(args.gpus), args, total_cpus)
        rows.append(row)
        print(f"{w} worker(s): {row['img_per_s']:.1f} img/s ({row['epoch_s']:.2f} s/epoch)", flush=True)
    return rows


def report(args: argparse.Namespace, rows: list[dict]) -> None:
    base = rows[0]["img_per_s"]
    device = "gpu" if args.gpus else "cpu"
    out = args.out or REPO / "bench" / "results" / f"scaling-{device}"
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} cores" + (f", {args.gpus} GPU(s)" if args.gpus else ", no GPU")
    lines = [
        f"# Pretraining scaling over Ray Train workers ({now})",
        "",
        f"Machine: {machine}. Command: `python bench/scaling.py {' '.join(sys.argv[1:])}`",
        "",
        f"{args.method}, `{args.preset}` preset input size, global batch {args.batch_size}, {args.images} images, "
        f"{args.epochs} epochs (the first is warm-up and not timed); images/s counts every augmented view.",
        "",
        "| workers | resources per worker | images/s | s/epoch | vs 1 worker |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        res = ", ".join(f"{v} {k}" for k, v in r["per_worker"].items())
        lines.append(
            f"| {r['workers']} | {res} | {r['img_per_s']:.1f} | {r['epoch_s']:.2f} | {r['img_per_s'] / base:.2f} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"date": now, "machine": machine, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
