"""Pretraining loop, optimiser and learning-rate schedule, shared by every method."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from inco_core.augment import augment_views
from inco_core.config import OptimConfig, PretrainConfig
from inco_core.device import autocast, prepare_input
from inco_core.distributed import all_reduce_mean, average_gradients, broadcast_state
from inco_core.errors import InCoError
from inco_core.methods.base import PretrainMethod, StepContext
from inco_core.progress import EpochLog, NullReporter, Reporter


class TrainingDiverged(InCoError):
    """The loss became NaN or infinite."""


class BatchPartition:
    """Which images form each global batch, epoch by epoch.

    ``fixed=True`` (BID): the data set is cut into batches once per run from ``seed``; each epoch
    only reorders the batches, so image i keeps its instance label. ``fixed=False``: a fresh
    permutation every epoch. A final batch of a single image is dropped (batch norm needs two).
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, fixed: bool) -> None:
        if n < 2:
            raise InCoError(f"pretraining needs at least 2 images (got {n})")
        self.n, self.batch_size, self.seed, self.fixed = n, batch_size, seed, fixed
        self._fixed = self._cut(torch.Generator().manual_seed(seed)) if fixed else None

    def _cut(self, gen: torch.Generator) -> list[Tensor]:
        batches = list(torch.randperm(self.n, generator=gen).split(self.batch_size))
        return [b for b in batches if len(b) >= 2]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest >= 2)

    def batches(self, epoch: int) -> list[Tensor]:
        """The global batches of ``epoch``: lists of positions into the pretraining set."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
        if self._fixed is None:
            return self._cut(gen)
        return [self._fixed[i] for i in torch.randperm(len(self._fixed), generator=gen).tolist()]

    @staticmethod
    def local(batch: Tensor, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
        """This rank's share of a global batch and its BID labels (global positions).

        Returns (positions [b_r], labels [b_r]); rank r's local image j has label start_r + j,
        which is r * local_n + j when the batch divides evenly.
        """
        chunks = torch.tensor_split(batch, world_size)
        start = sum(len(c) for c in chunks[:rank])
        mine = chunks[rank]
        return mine, torch.arange(start, start + len(mine))


def build_optimizer(params: Iterable[Any], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum or Adam; ``params`` may be parameter groups with their own ``lr``."""
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_schedule(
    opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier: linear warm-up, then constant or cosine decay to zero."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class PretrainRun:
    """What a pretraining run hands back: its epoch logs and the state to resume from."""

    history: list[EpochLog]
    state: dict[str, Any]


def pretrain(
    method: PretrainMethod,
    images: Tensor,
    cfg: PretrainConfig,
    *,
    seed: int,
    device: torch.device,
    reporter: Reporter | None = None,
    monitor: Callable[[nn.Module], float] | None = None,
    rank: int = 0,
    world_size: int = 1,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, Callable[[], dict[str, Any]]], None] | None = None,
    stage: str = "pretrain",
) -> PretrainRun:
    """Train ``method`` on ``images`` for ``cfg.epochs`` epochs.

    images: [N, C, H, W] uint8, the pretraining set (on ``device`` for speed, or on the CPU).
    monitor: called with the backbone every ``cfg.knn_every`` epochs (kNN accuracy), or None.
    resume: a state from :class:`PretrainRun` / ``on_epoch_end`` to continue from.
    on_epoch_end: called after each epoch with (epoch, make_state) for checkpoints.
    Raises :class:`TrainingDiverged` when the loss stops being finite.
    """
    reporter = reporter or NullReporter()
    method.to(device)
    method.train()
    broadcast_state(method)  # data-parallel ranks start from rank 0's weights
    partition = BatchPartition(len(images), cfg.batch_size, seed, fixed=method.fixed_partition)
    steps_per_epoch = len(partition)
    params = [p for p in method.trainable_parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.optim)
    sched = build_schedule(opt, cfg.optim, cfg.epochs * steps_per_epoch, steps_per_epoch)
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    start_epoch = 0
    if resume is not None:
        method.load_state_dict(resume["method"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["schedule"])
        gen.set_state(resume["generator"].to(gen.get_state().device))
        start_epoch = int(resume["epoch"])
        broadcast_state(method)

    def make_state(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "method": method.state_dict(),
            "optimizer": opt.state_dict(),
            "schedule": sched.state_dict(),
            "generator": gen.get_state(),
        }

    history: list[EpochLog] = []
    reporter.stage_start(stage, (cfg.epochs - start_epoch) * steps_per_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        sums: dict[str, float] = {}
        seen, t0 = 0, time.perf_counter()
        for step, batch in enumerate(partition.batches(epoch)):
            positions, labels = partition.local(batch, rank, world_size)
            # gradients are averaged over ranks: weighting each rank's mean loss by its share of the
            # global batch makes that average the gradient of the global batch's mean loss
            share = len(positions) * world_size / len(batch)
            views = augment_views(images[positions.to(images.device)].to(device), method.num_views, cfg.augment, gen)
            ctx = StepContext(epoch + step / steps_per_epoch, labels.to(device), cfg.batch_size, positions.to(device))
            with autocast(device):
                out = method.step(prepare_input(views, device), ctx)
            if not torch.isfinite(out.loss):
                raise TrainingDiverged(
                    f"{stage} diverged at epoch {epoch + 1} (loss {out.loss.item()}); "
                    "lower pretrain.optim.lr or use the default optimiser"
                )
            opt.zero_grad(set_to_none=True)
            (out.loss * share if world_size > 1 else out.loss).backward()
            average_gradients(params)
            opt.step()
            sched.step()
            method.after_optimizer_step()
            seen += len(views)
            for key, value in out.logs.items():
                sums[key] = sums.get(key, 0.0) + value
            reporter.step(stage, {**out.logs, "img_per_s": seen / (time.perf_counter() - t0)})
        metrics = all_reduce_mean({k: v / steps_per_epoch for k, v in sums.items()})
        metrics["img_per_s"] = seen * world_size / (time.perf_counter() - t0)  # all ranks
        metrics["lr"] = opt.param_groups[0]["lr"]
        if monitor is not None and cfg.knn_every and (epoch + 1) % cfg.knn_every == 0:
            metrics["knn"] = monitor(method.backbone)
            method.train()
        log = EpochLog(stage, epoch + 1, cfg.epochs, metrics)
        history.append(log)
        reporter.epoch_end(log)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, lambda e=epoch + 1: make_state(e))
    reporter.stage_end(stage)
    return PretrainRun(history, make_state(cfg.epochs))
