"""Training inside Ray Train: the per-worker function and the driver that builds the TorchTrainer.

The per-worker function turns Ray's config dict back into the run spec on its first line, runs the
``inco_core`` experiment, and (rank 0) writes metrics, results and artifacts to the store.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

try:  # Ray Train v2's internals (Ray >= 2.43); without them the trainer keeps every default callback
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.metrics import ControllerMetricsCallback, WorkerMetricsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
except ImportError:  # pragma: no cover - an older Ray
    DatasetsCallback = ControllerMetricsCallback = WorkerMetricsCallback = PlacementGroupCleanerCallback = None

from inco_core.config import RunSpec
from inco_core.errors import InCoError
from server.store import access
from server.store.db import session_scope
from server.store.models import Artifact, Model
from worker.placement import release_orphaned_placement_groups
from worker.reporting import StoreBackbones, StoreReporter, connect_store, with_retries

METRICS_ENV = "RAY_TRAIN_METRICS_ENABLED"  # Ray's own switch: set it to 1 to export Ray Train's metrics


class Trainer(TorchTrainer):
    """Ray Train's ``TorchTrainer`` without the helpers of each training run that the service does not
    use (each is a callback of the run's controller, some with an actor of their own, seconds of CPU to
    start and more while it polls):

    - the Ray Datasets manager: the service passes no datasets (each worker reads its images itself);
    - the placement-group cleaner, a detached actor that asks the Ray dashboard every second whether
      the run's controller still lives, to free the run's CPUs and GPUs if it died while its driver
      went on. A job's driver is its work horse, which ends with the job (Ray frees what an ended
      driver's actors held), and a search frees those of its trials itself
      (:func:`worker.placement.free_orphaned_placement_groups`);
    - Ray Train's metrics (controller and workers), unless ``RAY_TRAIN_METRICS_ENABLED`` is set: the
      service stores its own, and Ray's go to a Prometheus endpoint nobody reads by default.
    """

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        if PlacementGroupCleanerCallback is None:
            return callbacks
        unused: list[type] = [PlacementGroupCleanerCallback]
        if not self.datasets:
            unused.append(DatasetsCallback)
        if METRICS_ENV not in os.environ:
            unused += [ControllerMetricsCallback, WorkerMetricsCallback]
        return [cb for cb in callbacks if not isinstance(cb, tuple(unused))]


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    spec = RunSpec.model_validate(config["spec"])
    import torch

    from inco_core.experiment import Experiment

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
    torch.set_num_threads(max(1, cpus))
    engine, redis = connect_store()
    job_id, team_id = config["job_id"], config["team_id"]
    reporter = StoreReporter(engine, redis, job_id=job_id, rank=rank)
    experiment = Experiment(
        spec,
        run_dir=Path(config["run_dir"]),
        cache_dir=Path(config["cache_dir"]),
        backbones=StoreBackbones(engine, team_id=team_id, job_id=job_id, folder=Path(config["backbone_dir"])),
        pretrained={int(seed): Path(p) for seed, p in config["pretrained"].items()},
        reporter=reporter,
    )
    result = experiment.run(pretrain_only=config["kind"] == "pretrain")
    if rank == 0:
        save_result(engine, job_id=job_id, team_id=team_id, dataset=config["dataset"], result=result)
    engine.dispose()


def save_result(engine: Any, *, job_id: str, team_id: int, dataset: str, result: dict[str, Any]) -> None:
    """Result rows, and each trained classifier as an artifact and a model of the team, in one
    transaction (idempotent: a re-run stores nothing twice)."""
    classifiers = {
        row["checkpoint"]: classifier_info(Path(row["checkpoint"]))
        for row in result["results"]
        if row.get("checkpoint") and os.path.exists(row["checkpoint"])
    }

    def go() -> None:
        with session_scope(engine) as s:
            job = access.get_job(s, job_id=job_id, team_id=None)
            access.add_results(s, job=job, result=result, dataset=dataset)
            for row in result["results"]:
                info = classifiers.get(row.get("checkpoint") or "")
                if info is None:
                    continue
                artifact = access.add_artifact(
                    s,
                    artifact=Artifact(
                        team_id=team_id,
                        job_id=job_id,
                        kind="classifier",
                        key=f"{job_id}:{row['ratio']}:{row['eval']}:{row['seed']}",
                        method=row["method"],
                        seed=row["seed"],
                        path=row["checkpoint"],
                        size_bytes=os.path.getsize(row["checkpoint"]),
                        meta={"ratio": row["ratio"], "eval": row["eval"], "accuracy": row["accuracy"]},
                    ),
                )
                access.add_model(
                    s,
                    model=Model(
                        team_id=team_id,
                        job_id=job_id,
                        artifact_id=artifact.id,
                        dataset=dataset,
                        preset=result["spec"]["preset"],
                        method=row["method"],
                        variant=row["variant"],
                        ratio=row["ratio"],
                        eval=row["eval"],
                        seed=row["seed"],
                        classes=row["classes"],
                        image_size=info["image_size"],
                        normalisation=normalisation(info),
                        accuracy=row["accuracy"],
                        per_class_recall=row["per_class_recall"],
                        calibration_images=info.get("conformal", {}).get("images", 0),
                        code_version=result["code_version"],
                    ),
                )
            job.outputs = {
                **job.outputs,
                "backbones": [
                    {"seed": p["seed"], "key": p["key"], "reused": p["reused"]} for p in result["pretraining"]
                ],
            }
            s.add(job)
            n, took = len(result["results"]), result["wall_time_s"]
            access.add_log(
                s,
                job_id=job_id,
                message=f"stored {n} result row(s) and {len(classifiers)} model(s); {result['hardware']}, {took:.1f} s",
            )

    with_retries(go, what="results")


def classifier_info(path: Path) -> dict[str, Any]:
    """A classifier file's fields without its weights."""
    from inco_core.classifier import load_classifier

    return load_classifier(path)[1]


def normalisation(info: dict[str, Any]) -> dict[str, Any]:
    """How an image becomes the model's input, as a model card says it."""
    from inco_core.augment import PIXEL_MEAN, PIXEL_STD

    size = info["image_size"]
    return {
        "decode": f"one channel (PIL 'L'), resized to {size} x {size} (bilinear) when it is another size",
        "input": f"float32 [batch, 1, {size}, {size}], pixel values 0-255 (the exports normalise inside)",
        "pixel_mean": PIXEL_MEAN * 255.0,
        "pixel_std": PIXEL_STD * 255.0,
        "features": "standardised with the labelled images' mean and std" if info["eval"] == "linear" else "none",
        "output": "softmax probabilities, one per class in label order",
    }


def root_cause(exc: BaseException) -> BaseException:
    """The user-level exception behind Ray's wrappers (worker group errors, task errors)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            exc = failures[min(failures)]
            continue
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
            continue
        if isinstance(exc, InCoError):
            return exc
        if exc.__cause__ is not None:
            exc = exc.__cause__
            continue
        break
    return exc


def worker_resources(spec: RunSpec, cpus_per_worker: int) -> dict[str, float]:
    """What one training worker holds: ``cpus_per_worker`` CPUs and the spec's GPUs per worker."""
    held: dict[str, float] = {"CPU": cpus_per_worker}
    if spec.resources.gpus_each > 0:
        held["GPU"] = spec.resources.gpus_each
    return held


def scaling_config(spec: RunSpec, cpus_per_worker: int) -> ScalingConfig:
    """``resources.workers`` Ray Train workers of ``cpus_per_worker`` CPUs (and their GPUs)."""
    res = spec.resources
    return ScalingConfig(
        num_workers=res.workers, use_gpu=res.gpus_each > 0, resources_per_worker=worker_resources(spec, cpus_per_worker)
    )


def fit(
    config: dict[str, Any],
    spec: RunSpec,
    *,
    storage_path: Path,
    cpus_per_worker: int,
    restarts: int = 2,
    on_restart: Callable[[int, BaseException], None] | None = None,
) -> None:
    """Run ``train_loop`` on ``spec.resources.workers`` Ray Train workers.

    A worker group that crashes (a killed process, a lost node, an out-of-memory error) is started
    again up to ``restarts`` times and resumes from the run folder's last epoch checkpoint. A
    :class:`~server.errors.Canceled` or an ``InCoError`` (the spec or the data) is raised at once:
    running it again would end the same way. Ray's own ``FailureConfig`` would retry those too, so
    the restarts are counted here, with ``max_failures=0`` for each group.
    """
    for attempt in range(restarts + 1):
        trainer = Trainer(
            train_loop,
            train_loop_config=config,
            scaling_config=scaling_config(spec, cpus_per_worker),
            run_config=RunConfig(
                name=f"job-{config['job_id']}-group{attempt}",  # stable per job: a re-run finds its folders
                storage_path=str(storage_path),
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        try:
            trainer.fit()
            return
        except Exception as exc:
            cause = root_cause(exc)
            if isinstance(cause, InCoError) or attempt == restarts:
                raise cause from None
            release_orphaned_placement_groups("the crashed group")  # a dead controller holds the next group's CPUs
            if on_restart is not None:
                on_restart(attempt + 1, cause)
