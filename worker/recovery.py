"""Never lose a job: the database is the truth, the Redis queue only carries ids, and this module
puts the two back in line.

:func:`reconcile` runs when a worker starts and at every RQ maintenance pass (``INCO_MAINTENANCE_S``):

- a ``queued`` row that Redis does not hold (Redis restarted without its data, or the API died between
  storing the row and queueing it) is queued again;
- a ``running`` row whose heartbeat stopped (``INCO_STALE_AFTER_S``) while Redis knows of no work horse
  running it (Redis lost the job, or the machine with the worker and its Redis went away) is queued
  again, or ends ``failed`` with the reason once its retry budget (``INCO_JOB_RETRIES``) is spent.

Jobs that RQ itself still tracks (queued, deferred, scheduled, started) are left to RQ: its own
heartbeat finds dead work horses and retries them. :class:`Heartbeat` keeps a running job's
``heartbeat_at`` fresh from its work horse, independently of how long an epoch takes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus as RQStatus
from sqlalchemy.exc import SQLAlchemyError

from server import queue
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from server.store.models import Job, JobStatus, utcnow

log = logging.getLogger("inco.worker")

# a queued row younger than this may still be on its way into Redis (the API stores, then queues)
QUEUE_GRACE_S = 30
ALIVE = {RQStatus.QUEUED, RQStatus.DEFERRED, RQStatus.SCHEDULED, RQStatus.STARTED}


@dataclass
class Recovery:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def rq_status(redis: Redis, job_id: str) -> RQStatus | None:
    """What RQ knows of the job: its status, or None when Redis holds no such job."""
    try:
        status = RQJob.fetch(job_id, connection=redis).get_status(refresh=False)
    except NoSuchJobError:
        return None
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
    )
    if job.status != JobStatus.queued:
        job.status, job.stage, job.worker = JobStatus.queued, None, None
        session.add(job)
    access.add_log(session, job_id=job.id, level="warning", message=f"requeued: {why}")


def reconcile(engine: Any, redis: Redis, settings: Settings) -> Recovery:
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
            for job in access.stale_running_jobs(s, before=now - timedelta(seconds=settings.stale_after_s)):
                status = rq_status(redis, job.id)
                if status in ALIVE:
                    continue  # RQ still tracks it: its own heartbeat decides
                since = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "its start"
                if job.attempts > settings.job_retries:
                    last = f"; last error: {job.error}" if job.error else ""
                    access.finish_job(
                        s,
                        job_id=job.id,
                        status=JobStatus.failed,
                        error=f"no heartbeat since {since} and its worker is gone; {job.attempts} attempt(s) "
                        f"spent the retry budget (INCO_JOB_RETRIES={settings.job_retries}){last}",
                    )
                    out.failed.append(job.id)
                    continue
                _requeue(redis, settings, job, why=f"no heartbeat since {since} and no worker runs it", session=s)
                out.requeued.append(job.id)
    except (RedisError, SQLAlchemyError) as exc:  # a dependency is down: the next pass tries again
        log.warning("reconcile skipped: %s: %s", exc.__class__.__name__, exc)
        return out
    if out.requeued or out.failed:
        log.warning("reconcile: requeued %s, failed %s", out.requeued, out.failed)
    return out


class Heartbeat:
    """A thread that stamps the job's ``heartbeat_at`` every ``interval_s`` while it runs; a store
    that is briefly down only delays the next stamp."""

    def __init__(self, engine: Any, job_id: str, interval_s: float) -> None:
        self.engine, self.job_id, self.interval_s = engine, job_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with session_scope(self.engine) as s:
                    access.touch_job(s, job_id=self.job_id)
            except SQLAlchemyError as exc:
                log.warning("heartbeat of %s not stored: %s", self.job_id, exc.__class__.__name__)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
