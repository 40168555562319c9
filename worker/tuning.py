"""A ``tune`` job on Ray Tune: ASHA stops weak trials early, Optuna proposes the next point.

Each trial is a Tune function (:func:`trial_driver`) that runs :func:`inco_core.trial.run_trial`:
pretraining, scored every ``eval_every`` epochs by linear evaluation on a validation split of the
labelled training images. A trial of one worker (``resources.workers == 1``) trains in its Tune
function itself, which then holds the worker's CPUs (and GPUs): no Ray Train start per trial (a
controller and its helper actors, tens of CPU-seconds and about 15 s each). A trial of several
workers builds its own Ray Train ``TorchTrainer`` (DDP) and passes its reports to Tune through
``TuneReportCallback``; its driver holds no CPU (the Train workers hold them). Either way as many
trials run at once as the cluster has room for workers. The driver's :class:`StoreTrials` callback
writes every trial (its point, latest score, status and error) to the store; :class:`CancelStopper`
ends the search when the job is canceled.

A trial that ASHA stops ends with its Tune actor; a DDP trial's Train controller dies with it, and
the driver's :class:`FreeOrphanedPlacementGroups` then frees its workers' CPUs (Ray would only when
the search ends).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
from ray.train import FailureConfig, RunConfig
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search.optuna import OptunaSearch
from redis.exceptions import RedisError

from inco_core.config import RunSpec
from inco_core.errors import InCoError
from inco_core.search import SPACE, TuneSettings, grace_epochs, overrides_for, trial_spec
from server import queue
from server.errors import Canceled
from server.settings import Settings
from server.store import access
from server.store.db import make_engine, session_scope
from server.store.models import TrialStatus
from worker.placement import release_orphaned_placement_groups
from worker.reporting import StoreReporter, connect_store, with_retries
from worker.training import Trainer, root_cause, scaling_config, worker_resources

STOPPER_POLL_S = 1.0
ORPHANS_POLL_S = 2.0


NUMBER = "trial"  # the key of a trial's number in its config


def point_of(config: dict[str, Any]) -> dict[str, Any]:
    """The searched parameters of a trial's config (without its number)."""
    return {k: v for k, v in config.items() if k != NUMBER}


def trial_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a trial of several workers."""
    train_trial(config, report=ray.train.report, rank=ray.train.get_context().get_world_rank())


def train_trial(config: dict[str, Any], *, report: Callable[[dict[str, float]], None], rank: int) -> None:
    """One rank of a trial: its point's pretraining, scored and reported to Tune through ``report``."""
    import torch

    from inco_core.trial import run_trial

    spec = RunSpec.model_validate(config["spec"])
    settings = TuneSettings.model_validate(config["tune"])
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
    torch.set_num_threads(max(1, cpus))
    engine, redis = connect_store()
    try:
        run_trial(
            spec,
            settings,
            run_dir=Path(config["run_dir"]),
            cache_dir=Path(config["cache_dir"]),
            report=report,
            reporter=StoreReporter(engine, redis, job_id=config["job_id"], rank=rank),
            stage=config["stage"],
        )
    finally:
        engine.dispose()


def in_trial(spec: RunSpec) -> bool:
    """Whether a trial trains in its Tune function (one worker) instead of a TorchTrainer of its own."""
    return spec.resources.workers == 1


def trial_resources(spec: RunSpec, cpus_per_worker: int) -> dict[str, float]:
    """What one trial's Tune function holds: its one worker's CPUs and GPUs when it trains itself,
    else nothing (its Train workers hold them)."""
    if not in_trial(spec):
        return {"CPU": 0, "memory": 64 * 1024 * 1024}
    return worker_resources(spec, cpus_per_worker)


class TrialFailed(InCoError):
    """A trial's training failed (the message is the root cause behind Ray's wrappers), or no trial
    of a search ran to the end."""


def trial_driver(point: dict[str, Any], base: dict[str, Any]) -> None:
    """One trial (a Ray Tune function): the point's run spec trained here (one worker) or by its own
    TorchTrainer (several)."""
    number = int(point[NUMBER])
    spec = trial_spec(RunSpec.model_validate(base["spec"]), point_of(point))
    config = {
        **base,
        "spec": spec.model_dump(mode="json"),
        "stage": f"trial {number}",
        "run_dir": str(Path(base["run_dir"]) / f"trial-{number}"),
    }
    try:
        if in_trial(spec):
            train_trial(config, report=ray.tune.report, rank=0)
            return
        Trainer(
            trial_loop,
            train_loop_config=config,
            scaling_config=scaling_config(spec, base["cpus_per_worker"]),
            run_config=RunConfig(
                name=f"job-{base['job_id']}-attempt{base.get('attempt', 1)}-trial-{number}",  # new folders per attempt
                storage_path=base["storage_path"],
                callbacks=[TuneReportCallback()],
                failure_config=FailureConfig(max_failures=0),
            ),
        ).fit()
    except Exception as exc:
        cause = root_cause(exc)
        raise TrialFailed(f"{cause.__class__.__name__}: {cause}") from None


class StoreTrials(ray.tune.Callback):
    """Writes each trial's point, latest validation score, status and error to the store."""

    def __init__(self, *, job_id: str, epochs: int) -> None:
        self.job_id, self.epochs = job_id, epochs
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            self._engine = make_engine(Settings().db_url)
        return self._engine

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its run config: no connections in it
        return {**self.__dict__, "_engine": None}

    def _save(self, trial: Any, **fields: Any) -> None:
        number = int(trial.config[NUMBER])
        params = overrides_for(point_of(trial.config), self.epochs)

        def go() -> None:
            with session_scope(self.engine) as s:
                access.save_trial(
                    s,
                    job_id=self.job_id,
                    number=number,
                    trial_id=trial.trial_id,
                    params=params,
                    epochs=self.epochs,
                    **fields,
                )

        with_retries(go, what=f"trial {number}")

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._save(trial, status=TrialStatus.running)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if "score" in result:
            self._save(trial, score=float(result["score"]), epoch=int(result.get("epoch", 0)))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        epoch = int((trial.last_result or {}).get("epoch", 0))
        status = TrialStatus.completed if epoch >= self.epochs else TrialStatus.stopped
        self._save(trial, status=status)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._save(trial, status=TrialStatus.failed, error=trial_error(trial))


def trial_error(trial: Any) -> str:
    """The last line of a failed trial's error (``TrialFailed: <root cause>``)."""
    with contextlib.suppress(Exception):  # the error files may be gone: say so
        exc = trial.get_pickled_error()
        if exc is not None:
            return str(root_cause(exc))
    with contextlib.suppress(Exception):
        lines = [line for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
        tail = [line for line in lines if "TrialFailed:" in line]
        return (tail[-1] if tail else lines[-1]).split("TrialFailed: ", 1)[-1]
    return "the trial failed (its error file could not be read)"


class CancelStopper(ray.tune.Stopper):
    """Stops the whole search when the job's cancel flag is set."""

    def __init__(self, *, job_id: str) -> None:
        self.job_id = job_id
        self.canceled = False
        self._next = 0.0
        self._redis: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_redis": None}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.stop_all()

    def stop_all(self) -> bool:
        now = time.monotonic()
        if not self.canceled and now >= self._next:
            self._next = now + STOPPER_POLL_S
            with contextlib.suppress(RedisError):  # unreadable: keep searching, try again at the next poll
                self._redis = self._redis or queue.connect(Settings().redis_url)
                self.canceled = queue.cancel_requested(self._redis, job_id=self.job_id)
        return self.canceled


class FreeOrphanedPlacementGroups(ray.tune.Callback):
    """Every ``every_s`` of the search: frees what the Train controllers of ended DDP trials still
    hold (:func:`~worker.placement.free_orphaned_placement_groups`), so the next trials get their CPUs."""

    def __init__(self, every_s: float = ORPHANS_POLL_S) -> None:
        self.every_s = every_s
        self._next = 0.0

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every_s
        release_orphaned_placement_groups("ended trials")


class NumberedOptunaSearch(OptunaSearch):
    """Optuna's TPE through Ray Tune, numbering the points it proposes 1, 2, ... in their config."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.proposed = 0

    def suggest(self, trial_id: str) -> Any:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            self.proposed += 1
            config = {**config, NUMBER: self.proposed}
        return config


def _domain(name: str) -> Any:
    rng = SPACE[name]
    if rng.kind == "int":
        return ray.tune.randint(int(rng.low), int(rng.high) + 1)
    if rng.kind == "loguniform":
        return ray.tune.loguniform(rng.low, rng.high)
    return ray.tune.uniform(rng.low, rng.high)


def max_concurrent(settings: TuneSettings, spec: RunSpec, cpus_per_worker: int) -> int:
    """Trials at once: what the user asked for, else as many as the cluster fits (at least one)."""
    if settings.max_concurrent is not None:
        return settings.max_concurrent
    have = ray.cluster_resources()
    res = spec.resources
    fits = int(have.get("CPU", 1)) // max(1, res.workers * cpus_per_worker)
    if res.gpus:
        fits = min(fits, int(have.get("GPU", 0) // res.gpus))
    return max(1, min(fits, settings.trials))


def search(
    config: dict[str, Any],
    spec: RunSpec,
    settings: TuneSettings,
    *,
    storage_path: Path,
    cpus_per_worker: int,
) -> dict[str, Any]:
    """Run the search; returns the best completed trial (number, score, params) or raises.

    Raises :class:`~server.errors.Canceled` when the job was canceled, :class:`TrialFailed` (with the
    first trial's error) when no trial ran to the end.
    """
    import optuna
    from ray.tune.schedulers import ASHAScheduler

    job_id = config["job_id"]
    engine, redis = connect_store()
    epochs = spec.resolve().pretrain.epochs
    seed = spec.seeds[0]
    with session_scope(engine) as s:
        access.clear_trials(s, job_id=job_id)  # a re-run after a dead worker searches again
    concurrent = max_concurrent(settings, spec, cpus_per_worker)
    grace = grace_epochs(settings, epochs)
    with session_scope(engine) as s:
        access.add_log(
            s,
            job_id=job_id,
            message=f"searching {', '.join(settings.params)}: {settings.trials} trials, {concurrent} at once, "
            f"ASHA from epoch {grace} keeping 1/{settings.reduction_factor}, Optuna TPE (seed {seed})",
        )
    stopper = CancelStopper(job_id=job_id)
    base = {
        **config,
        "tune": settings.model_dump(mode="json"),
        "storage_path": str(storage_path),
        "cpus_per_worker": cpus_per_worker,
    }
    # max_t one past the last epoch: a trial that reaches it ends by itself instead of being stopped
    scheduler = ASHAScheduler(
        time_attr="epoch",
        metric="score",
        mode="max",
        max_t=epochs + 1,
        grace_period=min(grace, epochs),
        reduction_factor=settings.reduction_factor,
    )
    searcher = NumberedOptunaSearch(metric="score", mode="max", sampler=optuna.samplers.TPESampler(seed=seed))
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(
            ray.tune.with_parameters(trial_driver, base=base),
            trial_resources(spec, cpus_per_worker),
        ),
        param_space={name: _domain(name) for name in settings.params},
        tune_config=ray.tune.TuneConfig(
            num_samples=settings.trials,
            max_concurrent_trials=concurrent,
            scheduler=scheduler,
            search_alg=searcher,
            # a trial that ended hands its Ray actor (torch, Ray Train and the service loaded) to the next
            # one, which then starts without a new process (one still training when ASHA stopped it is
            # not reused: Tune ends it and starts a new one)
            reuse_actors=True,
        ),
        run_config=ray.tune.RunConfig(
            name=f"job-{job_id}-tune-attempt{config.get('attempt', 1)}",
            storage_path=str(storage_path),
            callbacks=[StoreTrials(job_id=job_id, epochs=epochs)]
            + ([] if in_trial(spec) else [FreeOrphanedPlacementGroups()]),
            stop=stopper,
            failure_config=ray.tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    try:
        try:
            tuner.fit()
        finally:
            canceled = stopper.canceled or queue.cancel_requested(redis, job_id=job_id)
            with session_scope(engine) as s:  # Tune reports no end for trials it stops with the search
                access.end_running_trials(
                    s, job_id=job_id, note="canceled with the job" if canceled else "the search ended first"
                )
        if canceled:
            raise Canceled(f"job {job_id} was canceled")
        with session_scope(engine) as s:
            best = access.best_trial(s, job_id=job_id)
            trials = access.list_trials(s, job_id=job_id)
            if best is None:
                errors = [t.error for t in trials if t.error]
                raise TrialFailed(
                    f"no trial ran to the end ({len(trials)} tried)" + (f"; first error: {errors[0]}" if errors else "")
                )
            counts = {status: sum(t.status == status for t in trials) for status in TrialStatus}
            summary = {
                "trial": best.number,
                "score": best.score,
                "params": best.params,
                "trials": {str(k): v for k, v in counts.items() if v},
            }
            job = access.get_job(s, job_id=job_id, team_id=None)
            job.outputs = {**job.outputs, "best": summary}
            s.add(job)
            score = best.score if best.score is not None else math.nan
            access.add_log(
                s,
                job_id=job_id,
                message=f"best: trial {best.number}, validation accuracy {score:.4f} with {best.params}; "
                + ", ".join(f"{v} {k}" for k, v in summary["trials"].items()),
            )
        return summary
    finally:
        engine.dispose()
