"""The queue's job function: ``run_job(job_id)`` runs one stored job on Ray and records how it ended.

It is idempotent and driven by the database: a job that ended is skipped, a job re-run after its
worker died starts a new attempt that resumes from the checkpoints in its run folder, and results
already stored are never stored twice.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from typing import Any

from inco_core.config import RunSpec
from inco_core.errors import InCoError
from server import queue
from server.errors import Canceled
from server.settings import Settings
from server.store import access
from server.store.db import make_engine, session_scope
from server.store.models import Job, JobKind, JobStatus
from worker.lease import JobLease, holder
from worker.reporting import with_retries

log = logging.getLogger("inco.worker")


def _finish(engine: Any, job_id: str, status: JobStatus, error: str | None = None) -> None:
    def go() -> None:
        with session_scope(engine) as s:
            access.finish_job(s, job_id=job_id, status=status, error=error)
            if status != JobStatus.succeeded:
                for dep in access.dependents(s, job_id=job_id):
                    access.finish_job(
                        s,
                        job_id=dep.id,
                        status=JobStatus.failed if status == JobStatus.failed else JobStatus.canceled,
                        error=f"pretrain job {job_id} ended {status}",
                    )

    with_retries(go, what=f"the end of job {job_id}")  # the store may be restarting: wait for it


def _expected_rows(spec: RunSpec, kind: JobKind) -> int:
    return 0 if kind in (JobKind.pretrain, JobKind.tune) else len(spec.seeds) * len(spec.ratios) * len(spec.evals)


def check_resources(spec: RunSpec, cpus_per_worker: int) -> int:
    """CPUs each Ray Train worker gets; a job that asks for more than the Ray cluster has fails at
    once with the numbers instead of waiting forever for resources."""
    import ray

    from inco_core.errors import ConfigError

    have = ray.cluster_resources()
    res = spec.resources
    gpus = res.gpus
    if gpus > have.get("GPU", 0):
        raise ConfigError(
            f"the job asks for {gpus:g} GPU(s) but the Ray cluster has {have.get('GPU', 0):g}: "
            "lower resources.workers / gpus_per_worker, or use device 'cpu'"
        )
    cpus = int(have.get("CPU", 0))
    if res.workers > cpus:
        raise ConfigError(
            f"the job asks for {res.workers} workers but the Ray cluster has {cpus} CPU(s), one per worker at "
            "least: lower resources.workers or add nodes to the cluster"
        )
    return max(1, min(cpus_per_worker, cpus // res.workers))


def check_data(spec: RunSpec, settings: Settings) -> None:
    """Read the job's images and split them before any Ray Train worker starts: an unreadable image or
    a folder with too few images fails the job in a second with its message, not after a training
    run's start (tens of CPU-seconds). The images are decoded into the cache the workers read."""
    from inco_core.experiment import load_split

    load_split(spec, spec.resolve(), settings.cache_dir)


def run_job(job_id: str) -> str:
    """RQ entry point (``worker.jobs.run_job``). Returns the status the job ended with."""
    settings = Settings()
    engine = make_engine(settings.db_url)
    redis = queue.connect(settings.redis_url)
    from worker.logs import job_logging  # job_id and team on every log line while the job runs

    try:
        with job_logging(engine, job_id), JobLease(redis, engine, job_id, lease_s=settings.lease_s) as lease:
            # a lease still held belongs to a process that died a moment ago (it lapses within INCO_LEASE_S)
            # or to one that runs the job now (it renews it): wait out the first, leave the job to the second
            if not lease.take(wait_s=settings.lease_s * 1.5):
                log.warning("job %s is running elsewhere (%s holds its lease): skipped", job_id, holder(redis, job_id))
                return "skipped"
            return _run(job_id, settings, engine, redis, lease)
    finally:
        engine.dispose()


def _run(job_id: str, settings: Settings, engine: Any, redis: Any, lease: JobLease) -> str:
    with session_scope(engine) as s:
        job = access.start_attempt(s, job_id=job_id, worker=lease.owner)
        if job is None:
            return "skipped"
        lease.attempt = job.attempts  # from now on a later attempt elsewhere stops this one
        snapshot = Job.model_validate(job.model_dump(warnings=False))
        pretrained: dict[str, str] = {}
        if snapshot.pretrained_job:
            dep = access.get_job(s, job_id=snapshot.pretrained_job, team_id=snapshot.team_id)
            if dep.status != JobStatus.succeeded:
                error = (
                    f"pretrain job {dep.id} ended {dep.status}"
                    if JobStatus(dep.status).finished
                    else (f"pretrain job {dep.id} has not finished ({dep.status})")
                )
                access.finish_job(s, job_id=job_id, status=JobStatus.failed, error=error)
                return "failed"
            for made in dep.outputs.get("backbones", []):
                art = access.find_artifact(s, team_id=snapshot.team_id, kind="backbone", key=made["key"])
                if art is not None:
                    pretrained[str(made["seed"])] = art.path
            missing = [seed for seed in snapshot.spec.get("seeds", []) if str(seed) not in pretrained]
            if missing:
                error = f"pretrain job {dep.id} left no backbone for seed(s) {missing}; submit a new pretrain job"
                access.finish_job(s, job_id=job_id, status=JobStatus.failed, error=error)
                return "failed"
        done = len(access.list_results(s, team_id=snapshot.team_id, job_id=job_id))
    if snapshot.cancel_requested or queue.cancel_requested(redis, job_id=job_id):
        _finish(engine, job_id, JobStatus.canceled, "canceled")
        return "canceled"

    spec = RunSpec.model_validate(snapshot.spec)
    kind = JobKind(snapshot.kind)
    if done and done >= _expected_rows(spec, kind):  # a re-run after the results were stored
        _finish(engine, job_id, JobStatus.succeeded)
        return "succeeded"

    from worker.training import fit  # ray and torch load here, in the job's process

    run_dir = settings.artifact_dir / "runs" / job_id
    config = {
        "job_id": job_id,
        "attempt": snapshot.attempts,
        "team_id": snapshot.team_id,
        "kind": kind.value,
        "spec": spec.model_dump(mode="json"),
        "dataset": spec.data.dataset or "",
        "pretrained": pretrained,
        "run_dir": str(run_dir),
        "cache_dir": str(settings.cache_dir),
        "backbone_dir": str(settings.artifact_dir / "teams" / str(snapshot.team_id) / "backbones"),
    }
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # fails here, before Ray starts, if it cannot be made
        check_data(spec, settings)
        _connect_ray(settings)
        cpus = check_resources(spec, settings.cpus_per_worker)
        res = spec.resources
        with session_scope(engine) as s:
            gpus = f", {res.gpus_each:g} GPU(s)" if res.gpus_each else ""
            access.add_log(s, job_id=job_id, message=f"training on {res.workers} workers of {cpus} CPU(s){gpus} each")

        def restarting(n: int, cause: BaseException) -> None:
            with session_scope(engine) as s:
                access.add_log(
                    s,
                    job_id=job_id,
                    level="warning",
                    message=f"worker group failed ({cause.__class__.__name__}: {cause}); "
                    f"restart {n}/{settings.train_restarts} from the last checkpoint",
                )

        if kind == JobKind.tune:
            from inco_core.search import TuneSettings
            from worker.tuning import search

            tune = TuneSettings.model_validate(snapshot.tune or {})
            search(config, spec, tune, storage_path=settings.artifact_dir / "ray", cpus_per_worker=cpus)
        else:
            fit(
                config,
                spec,
                storage_path=settings.artifact_dir / "ray",
                cpus_per_worker=cpus,
                restarts=settings.train_restarts,
                on_restart=restarting,
            )
    except Canceled:
        _finish(engine, job_id, JobStatus.canceled, "canceled while running")
        return "canceled"
    except InCoError as exc:  # the spec or the data: running it again would fail the same way
        _finish(engine, job_id, JobStatus.failed, str(exc))
        return "failed"
    except Exception as exc:
        message = f"{exc.__class__.__name__}: {exc}"
        log.error("job %s crashed: %s", job_id, traceback.format_exc())
        retry = _retries_left() > 0
        with session_scope(engine) as s:  # the error stays on the job while it is retried
            access.add_log(s, job_id=job_id, level="error", message=f"attempt crashed: {message}")
            access.set_error(s, job_id=job_id, error=message)
        if retry:
            raise  # RQ runs it again; the next attempt resumes from the run folder
        _finish(engine, job_id, JobStatus.failed, message)
        return "failed"
    _finish(engine, job_id, JobStatus.succeeded)
    return "succeeded"


def _retries_left() -> int:
    from rq import get_current_job

    current = get_current_job()
    return int(current.retries_left or 0) if current is not None else 0


def ray_runtime_env(settings: Settings) -> dict[str, Any]:
    """What the job's Ray workers need to reach the store and the queue, as environment variables of
    the Ray job (held by Ray's GCS, never written to a run folder)."""
    return {"env_vars": {"INCO_DATABASE_URL": settings.db_url, "INCO_REDIS_URL": settings.redis_url}}


RAY_ANSWER_S = 30  # a head that does not take a connection within this is gone


def check_ray_answers(address: str | None, timeout_s: float = RAY_ANSWER_S) -> None:
    """Raise ConnectionError when the Ray head at ``address`` (``host:port``) takes no TCP connection
    within ``timeout_s``: ``ray.init`` would wait for a dead head forever and the job with it, while
    this attempt fails and is retried (by a worker whose head is up). Other address forms (``auto``,
    ``ray://``) are left to Ray."""
    host, _, port = (address or "").rpartition(":")
    if not host or "/" in host or not port.isdigit():
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(f"the Ray head at {address} does not answer ({exc}); is it running?") from None
            time.sleep(1)


def _connect_ray(settings: Settings) -> None:
    import ray

    if not ray.is_initialized():
        check_ray_answers(os.environ.get("RAY_ADDRESS"))
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or None,
            logging_level="WARNING",
            log_to_driver=False,
            runtime_env=ray_runtime_env(settings),
        )
