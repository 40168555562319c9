"""Pretraining throughput: the InCo step (augment K views + ResNet18 + BID + DWV + SGD) against a
bare PyTorch ResNet18 forward/backward/step on the same batch shapes, in one run, as a ratio.

    python bench/throughput.py --device cpu --size 64 --batch 64 --views 5 --steps 6 --rounds 3

Rounds alternate the two loops so that drift in machine load hits both. Writes
``bench/results/throughput-<device>.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from inco_core.config import PretrainConfig
from inco_core.device import autocast, hardware, prepare_input, prepare_model
from inco_core.methods import build_method
from inco_core.models import Backbone
from inco_core.train import pretrain


def bare_loop(device: torch.device, n_inputs: int, size: int, classes: int, steps: int) -> float:
    """Inputs per second of plain ResNet18 + Linear + cross-entropy + SGD on fixed tensors."""
    model = prepare_model(torch.nn.Sequential(Backbone(), torch.nn.Linear(512, classes)), device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = prepare_input(torch.randn(n_inputs, 1, size, size, device=device), device)
    y = torch.arange(n_inputs, device=device) % classes

    def one() -> None:
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    one()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(device)
    return steps * n_inputs / (time.perf_counter() - t0)


def inco_loop(device: torch.device, batch: int, views: int, size: int, steps: int) -> float:
    """Inputs (augmented views) per second of the real InCo pretraining loop, one epoch of
    ``steps`` batches of uint8 images, augmentation included."""
    cfg = PretrainConfig(epochs=1, batch_size=batch, knn_every=0, inco={"views": views, "t1": 0, "t2": 1})
    images = torch.randint(0, 256, (batch * steps, 1, size, size), dtype=torch.uint8, device=device)
    warm = prepare_model(build_method("inco", cfg), device)
    pretrain(warm, images[:batch], cfg, seed=0, device=device)  # warm-up
    method = prepare_model(build_method("inco", cfg), device)
    _sync(device)
    t0 = time.perf_counter()
    pretrain(method, images, cfg, seed=0, device=device)
    _sync(device)
    return steps * batch * views / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--views", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n_inputs = args.batch * args.views
    bare, inco = [], []
    for r in range(args.rounds):
        bare.append(bare_loop(device, n_inputs, args.size, args.batch, args.steps))
        inco.append(inco_loop(device, args.batch, args.views, args.size, args.steps))
        print(
            f"round {r + 1}: bare {bare[-1]:.1f} img/s, InCo {inco[-1]:.1f} img/s, ratio {inco[-1] / bare[-1]:.3f}",
            flush=True,
        )
    ratios = [i / b for i, b in zip(inco, bare, strict=True)]
    cmd = (
        f"python bench/throughput.py --device {args.device} --size {args.size} --batch {args.batch} "
        f"--views {args.views} --steps {args.steps} --rounds {args.rounds}"
    )
    lines = [
        f"# Pretraining throughput on `{args.device}`",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {hardware(device)}; {platform.machine()}, torch {torch.__version__}",
        f"- Shapes: {args.batch} images x K={args.views} views = {n_inputs} inputs of 1x{args.size}x{args.size} per step, "
        f"{args.steps} steps per measurement, {args.rounds} alternating rounds",
        "",
        "| loop | inputs/s (median) | all rounds |",
        "|---|---|---|",
        f"| bare ResNet18 fwd/bwd/SGD on fixed tensors | {statistics.median(bare):.1f} | {', '.join(f'{v:.1f}' for v in bare)} |",
        f"| InCo step (augment + BID + DWV + SGD + schedule) | {statistics.median(inco):.1f} | {', '.join(f'{v:.1f}' for v in inco)} |",
        "",
        f"**Ratio InCo / bare: {statistics.median(ratios):.3f}** (per round: {', '.join(f'{r:.3f}' for r in ratios)}; target >= 0.85)",
        "",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"throughput-{args.device.split(':')[0]}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
