"""One trial of a search: pretrain with one point of the search space, score it on validation images.

A trial scores the backbone every ``eval_every`` epochs by linear evaluation on a *validation* split
carved out of the labelled training images of the ratio (``fit`` trains the linear classifier,
``val`` scores it). The test images are never handed to a trial: :func:`trial_data` checks it, and
:func:`run_trial` records the indices it used in ``indices.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from inco_core.config import RunSpec
from inco_core.data import ImageSet
from inco_core.device import prepare_model, select_device
from inco_core.distributed import world
from inco_core.errors import DataError
from inco_core.evaluate import EvalData, linear_eval
from inco_core.experiment import load_split, pretrain_pool
from inco_core.methods import build_method
from inco_core.progress import Reporter
from inco_core.search import TuneSettings
from inco_core.splits import Split, labelled_subsets
from inco_core.train import pretrain


def validation_split(
    labels: Tensor, labelled: Tensor, classes: list[str], *, fraction: float, seed: int
) -> tuple[Tensor, Tensor]:
    """Cut the labelled training images into (fit, val), stratified: per class, round(n x fraction)
    images (at least one, and one left to fit) are held out. Raises :class:`DataError` when a class
    has fewer than 2 labelled images."""
    gen = torch.Generator().manual_seed(seed + 7919)
    fit: list[Tensor] = []
    val: list[Tensor] = []
    for c, name in enumerate(classes):
        members = labelled[labels[labelled] == c]
        if len(members) < 2:
            raise DataError(
                f"class {name} has {len(members)} labelled image(s) at this ratio; scoring trials needs 2 per class "
                "(one to fit, one to validate): use a smaller N in 1:N"
            )
        order = members[torch.randperm(len(members), generator=gen)]
        n_val = min(max(round(len(members) * fraction), 1), len(members) - 1)
        val.append(order[:n_val])
        fit.append(order[n_val:])
    return torch.sort(torch.cat(fit)).values, torch.sort(torch.cat(val)).values


@dataclass(frozen=True)
class TrialData:
    """Indices into the image set that a trial uses; the test images are not among them."""

    pretrain: Tensor
    fit: Tensor
    val: Tensor

    def as_json(self) -> dict[str, list[int]]:
        return {"pretrain": self.pretrain.tolist(), "fit": self.fit.tolist(), "val": self.val.tolist()}


def trial_data(
    ds: ImageSet, split: Split, spec: RunSpec, settings: TuneSettings, *, seed: int | None = None
) -> TrialData:
    """The pretraining images, the labelled images that fit the linear classifier and those that
    score it, for the spec's ratio and seed. Raises :class:`DataError` if any is a test image."""
    cfg = spec.resolve()
    seed = spec.seeds[0] if seed is None else seed
    ratio = spec.ratio_values[0]
    labelled = labelled_subsets(ds.labels, split.train, ds.classes, [ratio], seed=seed)[ratio]
    fit, val = validation_split(ds.labels, labelled, ds.classes, fraction=settings.val_fraction, seed=seed)
    data = TrialData(pretrain_pool(split.train, labelled, cfg, seed), fit, val)
    test = set(split.test.tolist())
    for name in ("pretrain", "fit", "val"):
        leaked = test.intersection(getattr(data, name).tolist())
        if leaked:  # a bug, never a user error: trials must not select on test images
            raise DataError(f"{len(leaked)} test image(s) in the trial's {name} set")
    return data


def run_trial(
    spec: RunSpec,
    settings: TuneSettings,
    *,
    run_dir: Path,
    cache_dir: Path | None,
    report: Callable[[dict[str, float]], None],
    reporter: Reporter | None = None,
    stage: str = "pretrain",
) -> dict[str, Any]:
    """Pretrain with ``spec`` and score it every ``settings.eval_every`` epochs (and at the last).

    ``report`` is called on every data-parallel rank at every scored epoch with ``{"epoch": e}``;
    on rank 0 the dict also holds ``score``, the validation accuracy (0..1). Returns the last
    metrics (rank 0) and writes ``indices.json`` (the images the trial used) to ``run_dir``.
    """
    cfg = spec.resolve()
    device = select_device(spec.resources.device)
    rank, world_size = world()
    seed = spec.seeds[0]
    ds, split = load_split(spec, cfg, cache_dir)
    data = trial_data(ds, split, spec, settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        tmp = run_dir / f".indices.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps({**data.as_json(), "test_images": len(split.test)}))
        os.replace(tmp, run_dir / "indices.json")
    val_data = EvalData(ds.images[data.fit], ds.labels[data.fit], ds.images[data.val], ds.labels[data.val], ds.classes)
    torch.manual_seed(seed)
    method = prepare_model(build_method(spec.method, cfg.pretrain), device)
    epochs = cfg.pretrain.epochs
    last: dict[str, float] = {}

    def score(epoch: int, _make_state: Any) -> None:
        if epoch % settings.eval_every and epoch != epochs:
            return
        metrics: dict[str, float] = {"epoch": epoch}
        if rank == 0:
            with torch.random.fork_rng(devices=[]):  # the probe's seeding must not move training's RNG
                probe, _ = linear_eval(method.backbone, val_data, cfg.linear, seed=seed, device=device)
            metrics["score"] = probe.accuracy
            last.clear()
            last.update(metrics)
        report(metrics)

    pretrain(
        method,
        ds.images[data.pretrain].to(device),
        cfg.pretrain,
        seed=seed,
        device=device,
        reporter=reporter,
        rank=rank,
        world_size=world_size,
        on_epoch_end=score,
        stage=stage,
    )
    return last
