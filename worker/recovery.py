"""Never lose a job: the database is the truth, the Redis queue only carries ids, and this module
puts the two back in line.

:func:`reclaim` runs every second in every worker (:class:`Watchdog`), and finds the jobs whose process
died: a ``running`` row whose lease is gone from Redis and whose store heartbeat is older than the lease
(``INCO_LEASE_S``, see :mod:`worker.lease`). Such a job goes back on the queue at once, at its front,
where an idle worker takes it and resumes it from its checkpoints, or it ends ``failed`` with the
reason once its retry budget (``INCO_JOB_RETRIES``) is spent. When RQ still tracks the job as started
(its worker died with it), RQ's own abandoned-job path runs for it, so RQ's retry count and exception
handlers stay in charge; when Redis lost the job, it is queued again from the row.

:func:`reconcile` runs when a worker starts and at every RQ maintenance pass (``INCO_MAINTENANCE_S``):
it queues again ``queued`` rows that Redis does not hold (Redis restarted without its data, or the API
died between storing the row and queueing it), then runs :func:`reclaim`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus as RQStatus
from rq.registry import StartedJobRegistry
from sqlalchemy.exc import SQLAlchemyError

from server import queue
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from server.store.models import Job, JobStatus, utcnow
from worker.lease import lease_key

log = logging.getLogger("inco.worker")

# each worker's own liveness, kept by its watchdog thread (INCO_LEASE_S)
WORKER_ALIVE_KEY = "inco:worker-alive:{}"
# a queued row younger than this may still be on its way into Redis (the API stores, then queues)
QUEUE_GRACE_S = 30
ALIVE = {RQStatus.QUEUED, RQStatus.DEFERRED, RQStatus.SCHEDULED, RQStatus.STARTED}
# RQ's maintenance lock lives 899 s; a pass takes milliseconds, so one held longer than this was left
# behind by a worker that died during its pass
STALE_MAINTENANCE_LOCK_S = 60


@dataclass
class Recovery:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the pass could not run (Redis or the store is down)


def _why(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {first}"


def rq_fetch(redis: Redis, job_id: str) -> RQJob | None:
    try:
        return RQJob.fetch(job_id, connection=redis)
    except NoSuchJobError:
        return None


def rq_status(redis: Redis, job_id: str) -> RQStatus | None:
    """What RQ knows of the job: its status, or None when Redis holds no such job."""
    rq_job = rq_fetch(redis, job_id)
    status = rq_job.get_status(refresh=False) if rq_job is not None else None
    return RQStatus(status) if status is not None else None


def _requeue(redis: Redis, settings: Settings, job: Job, *, why: str, session: Any) -> None:
    parent = session.get(Job, job.pretrained_job) if job.pretrained_job else None
    waits_for = parent.id if parent is not None and not JobStatus(parent.status).finished else None
    queue.enqueue(
        redis,
        queue_name=settings.queue,
        job_id=job.id,
        depends_on=waits_for,
        retries=max(0, settings.job_retries - job.attempts),
        timeout_s=settings.job_timeout_s,
        at_front=True,
    )
    if job.status != JobStatus.queued:
        job.status, job.stage, job.worker = JobStatus.queued, None, None
        session.add(job)
    access.add_log(session, job_id=job.id, level="warning", message=f"requeued: {why}")


def abandon_started(redis: Redis, queue_name: str, job_id: str, exception_handlers: list[Any]) -> bool:
    """Run RQ's abandoned-job path for one started job now instead of after its RQ heartbeat expires:
    its retry (at the front of the queue) or, with no retry left, its failure and exception handlers.

    Holds RQ's maintenance lock meanwhile, so neither another worker's pass nor RQ's own registry
    cleaning handles the same job too. False when the lock is busy (the next pass tries again)."""
    q = Queue(queue_name, connection=redis)
    lock = q.registry_cleaning_key
    if not redis.set(lock, "inco-reclaim", nx=True, ex=30):
        ttl = redis.ttl(lock)
        if not (ttl is not None and 0 < ttl < 899 - STALE_MAINTENANCE_LOCK_S):
            return False
        log.warning("taking over RQ's maintenance lock of %s, left behind %d s ago", queue_name, 899 - ttl)
        redis.set(lock, "inco-reclaim", ex=30)
    try:
        registry = StartedJobRegistry(queue=q)
        mine = [e for e in redis.zrange(registry.key, 0, -1) if registry.parse_job_id(e) == job_id]
        if not mine:
            return False
        # its executions expire now: RQ's cleanup (which takes the ones expired by a timestamp) takes them
        redis.zadd(registry.key, dict.fromkeys(mine, 0), xx=True)
        registry.cleanup(timestamp=1, exception_handlers=exception_handlers)
        return True
    finally:
        redis.delete(lock)


def reclaim(engine: Any, redis: Redis, settings: Settings, exception_handlers: list[Any] | None = None) -> Recovery:
    """Queue again (or fail) the running jobs whose process died: lease gone and store heartbeat older
    than the lease. See the module doc."""
    out = Recovery()
    now = utcnow()
    try:
        with session_scope(engine) as s:
            lease = timedelta(seconds=settings.lease_s)
            for job in access.stale_running_jobs(s, before=now - lease):
                if redis.exists(lease_key(job.id)):
                    continue  # its process holds the lease: alive, the store stamps are only late
                since = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "its start"
                why = f"no heartbeat since {since} and no lease: the process that ran it is gone"
                rq_job = rq_fetch(redis, job.id)
                status = RQStatus(rq_job.get_status(refresh=False)) if rq_job is not None else None
                if status == RQStatus.STARTED:
                    started = rq_job.started_at.replace(tzinfo=None) if rq_job.started_at else None
                    if started is not None and started > now.replace(tzinfo=None) - lease:
                        continue  # a work horse was just given it and is about to take its lease
                    if rq_job.worker_name and redis.exists(WORKER_ALIVE_KEY.format(rq_job.worker_name)):
                        continue  # its worker lives: it sees its work horse die itself (and retries it)
                    if abandon_started(redis, settings.queue, job.id, exception_handlers or []):
                        access.add_log(s, job_id=job.id, level="warning", message=f"requeued: {why}")
                        out.requeued.append(job.id)
                    continue
                if status in ALIVE:
                    continue  # on the queue already: a worker will take it
                if job.attempts > settings.job_retries:
                    last = f"; last error: {job.error}" if job.error else ""
                    access.finish_job(
                        s,
                        job_id=job.id,
                        status=JobStatus.failed,
                        error=f"{why}; {job.attempts} attempt(s) spent the retry budget "
                        f"(INCO_JOB_RETRIES={settings.job_retries}){last}",
                    )
                    out.failed.append(job.id)
                    continue
                _requeue(redis, settings, job, why=why, session=s)
                out.requeued.append(job.id)
    except (RedisError, SQLAlchemyError) as exc:  # a dependency is down: the next pass tries again
        out.skipped = _why(exc)
        return out
    if out.requeued or out.failed:
        log.warning("reclaim: requeued %s, failed %s", out.requeued, out.failed)
    return out


def reconcile(engine: Any, redis: Redis, settings: Settings, exception_handlers: list[Any] | None = None) -> Recovery:
    """Queue again what the database says should run but Redis does not hold; see the module doc."""
    out = Recovery()
    now = utcnow()
    try:
        with session_scope(engine) as s:
            settled = now - timedelta(seconds=QUEUE_GRACE_S)
            for job in access.jobs_with_status(s, status=JobStatus.queued, before=settled):
                status = rq_status(redis, job.id)
                if status in ALIVE:
                    continue
                _requeue(redis, settings, job, why=f"the queue had lost it ({status or 'not in Redis'})", session=s)
                out.requeued.append(job.id)
    except (RedisError, SQLAlchemyError) as exc:  # a dependency is down: the next pass tries again
        log.warning("reconcile skipped: %s", _why(exc))
        return Recovery(skipped=_why(exc))
    if out.requeued:
        log.warning("reconcile: requeued %s", out.requeued)
    found = reclaim(engine, redis, settings, exception_handlers)
    if found.skipped:
        log.warning("reclaim skipped: %s", found.skipped)
    return Recovery(out.requeued + found.requeued, found.failed, found.skipped)


class Watchdog:
    """A thread of ``inco worker`` that runs :func:`reclaim` every ``every_s``, busy or idle, so a job
    whose worker died is queued again within seconds of its lease lapsing. It also keeps the worker's
    own liveness key (``worker_name``, lapsing after ``INCO_LEASE_S``): a job RQ started on a living
    worker is never taken for dead (its worker sees its work horse die, and a work horse slow to renew
    its lease, busy starting under load, is not dead)."""

    def __init__(
        self,
        engine: Any,
        redis: Redis,
        settings: Settings,
        exception_handlers: list[Any],
        every_s: float = 1.0,
        worker_name: str | None = None,
    ) -> None:
        self.engine, self.redis, self.settings, self.handlers = engine, redis, settings, exception_handlers
        self.every_s, self.worker_name = every_s, worker_name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inco-watchdog", daemon=True)

    def _run(self) -> None:
        down_since: float | None = None  # a dependency is down: say so when it goes, every minute, and when back
        said = 0.0
        while not self._stop.wait(self.every_s):
            if self.worker_name:  # this worker lives: the job its work horse runs is its own to retry
                with contextlib.suppress(RedisError):
                    self.redis.set(WORKER_ALIVE_KEY.format(self.worker_name), 1, px=int(self.settings.lease_s * 1000))
            try:
                out = reclaim(self.engine, self.redis, self.settings, self.handlers)
            except Exception:  # never let the thread die: log and go on
                log.exception("reclaim pass failed")
                continue
            now = time.monotonic()
            if out.skipped and (down_since is None or now - said > 60):
                log.warning("reclaim passes skipped: %s", out.skipped)
                down_since, said = down_since or now, now
            elif not out.skipped and down_since is not None:
                log.info("reclaim passes run again after %.0f s", now - down_since)
                down_since = None

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
