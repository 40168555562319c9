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

from inco_core.config import RunSpec
from inco_core.errors import InCoError
from server.store import access
from server.store.db import session_scope
from server.store.models import Artifact
from worker.reporting import StoreBackbones, StoreReporter, connect_store, with_retries


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
    """Result rows and fine-tuned model artifacts, in one transaction (idempotent)."""

    def go() -> None:
        with session_scope(engine) as s:
            job = access.get_job(s, job_id=job_id, team_id=None)
            access.add_results(s, job=job, result=result, dataset=dataset)
            for row in result["results"]:
                if row.get("checkpoint") and os.path.exists(row["checkpoint"]):
                    access.add_artifact(
                        s,
                        artifact=Artifact(
                            team_id=team_id,
                            job_id=job_id,
                            kind="finetuned",
                            key=f"{job_id}:{row['ratio']}:{row['seed']}",
                            method=row["method"],
                            seed=row["seed"],
                            path=row["checkpoint"],
                            size_bytes=os.path.getsize(row["checkpoint"]),
                            meta={"ratio": row["ratio"], "accuracy": row["accuracy"]},
                        ),
                    )
            job.outputs = {
                **job.outputs,
                "backbones": [
                    {"seed": p["seed"], "key": p["key"], "reused": p["reused"]} for p in result["pretraining"]
                ],
            }
            s.add(job)
            hw = result["hardware"]
            n = len(result["results"])
            access.add_log(s, job_id=job_id, message=f"stored {n} result row(s); {hw}, {result['wall_time_s']:.1f} s")

    with_retries(go, what="results")


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


def scaling_config(spec: RunSpec, cpus_per_worker: int) -> ScalingConfig:
    """``resources.workers`` Ray Train workers of ``cpus_per_worker`` CPUs (and their GPUs)."""
    res = spec.resources
    use_gpu = res.gpus_each > 0
    per_worker: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = res.gpus_each
    return ScalingConfig(num_workers=res.workers, use_gpu=use_gpu, resources_per_worker=per_worker)


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
        trainer = TorchTrainer(
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
            if on_restart is not None:
                on_restart(attempt + 1, cause)
