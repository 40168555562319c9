"""The recovery pass (worker/recovery.py) against real Redis and the store on SQLite and PostgreSQL:
queued rows Redis lost are queued again, running jobs without a heartbeat and without a work horse
are queued again or fail once their retry budget is spent, and what RQ still tracks is left alone."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job as RQJob

from server import queue
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from server.store.models import Job, JobCreate, JobStatus, utcnow
from worker.recovery import QUEUE_GRACE_S, Heartbeat, reconcile

pytestmark = pytest.mark.integration
REDIS_RECOVERY = "redis://127.0.0.1:6379/5"


@pytest.fixture
def redis_db() -> Redis:  # its own database: other tests flush theirs
    redis = Redis.from_url(REDIS_RECOVERY)
    redis.flushdb()
    return redis


@pytest.fixture
def settings(settings: Settings, redis_db: Redis) -> Settings:
    return settings.model_copy(update={"redis_url": REDIS_RECOVERY})


def _job(engine, *, status: JobStatus = JobStatus.queued, age_s: float = 3600, attempts: int = 0, **kw) -> str:
    with session_scope(engine) as s:
        team = access.ensure_team(s, name="alpha")
        request = JobCreate.model_validate({"spec": {"ratios": ["1:16"], "preset": "smoke"}})
        job = access.create_job(s, team_id=team.id, request=request, spec=request.spec.model_dump(mode="json"))
        past = utcnow() - timedelta(seconds=age_s)
        job.status, job.created_at, job.attempts = status, past, attempts
        if status == JobStatus.running:
            job.started_at = job.heartbeat_at = past
        for k, v in kw.items():
            setattr(job, k, v)
        s.add(job)
        return job.id


def _get(engine, job_id: str) -> Job:
    with session_scope(engine) as s:
        return Job.model_validate(s.get(Job, job_id).model_dump(warnings=False))


def _queued_ids(redis: Redis, settings: Settings) -> list[str]:
    return Queue(settings.queue, connection=redis).job_ids


def test_a_queued_job_that_redis_lost_is_queued_again(engine, redis_db: Redis, settings: Settings) -> None:
    lost = _job(engine)
    fresh = _job(engine, age_s=QUEUE_GRACE_S / 3)  # the API may still be queueing it
    held = _job(engine)
    queue.enqueue(redis_db, queue_name=settings.queue, job_id=held)
    out = reconcile(engine, redis_db, settings)
    assert out.requeued == [lost] and out.failed == []
    assert sorted(_queued_ids(redis_db, settings)) == sorted([held, lost])
    assert _get(engine, lost).status == JobStatus.queued
    with session_scope(engine) as s:
        assert any("requeued: the queue had lost it" in m.message for m in access.list_logs(s, job_id=lost))
    assert reconcile(engine, redis_db, settings).requeued == []  # a second pass changes nothing
    assert fresh not in _queued_ids(redis_db, settings)


def test_a_running_job_without_heartbeat_or_work_horse_is_requeued(engine, redis_db: Redis, settings: Settings) -> None:
    stuck = _job(engine, status=JobStatus.running, attempts=1, age_s=settings.stale_after_s + 60)
    beating = _job(engine, status=JobStatus.running, attempts=1, age_s=5)
    out = reconcile(engine, redis_db, settings)
    assert out.requeued == [stuck]
    job = _get(engine, stuck)
    assert job.status == JobStatus.queued and job.worker is None and job.attempts == 1
    rq_job = RQJob.fetch(stuck, connection=redis_db)
    assert rq_job.retries_left == settings.job_retries - 1  # the attempt it already spent counts
    assert _get(engine, beating).status == JobStatus.running and beating not in _queued_ids(redis_db, settings)


def test_a_stuck_job_past_its_retry_budget_fails_with_the_last_error(
    engine, redis_db: Redis, settings: Settings
) -> None:
    stuck = _job(
        engine,
        status=JobStatus.running,
        attempts=settings.job_retries + 1,
        age_s=settings.stale_after_s + 60,
        error="RuntimeError: CUDA error: an illegal memory access",
    )
    out = reconcile(engine, redis_db, settings)
    assert out.failed == [stuck] and out.requeued == []
    job = _get(engine, stuck)
    assert job.status == JobStatus.failed
    assert "spent the retry budget" in job.error and "last error: RuntimeError: CUDA error" in job.error
    assert _queued_ids(redis_db, settings) == []


def test_jobs_rq_still_tracks_are_left_to_rq(engine, redis_db: Redis, settings: Settings) -> None:
    stuck = _job(engine, status=JobStatus.running, attempts=1, age_s=settings.stale_after_s + 60)
    queue.enqueue(redis_db, queue_name=settings.queue, job_id=stuck)  # RQ will run it (again) itself
    assert reconcile(engine, redis_db, settings).requeued == []
    assert _get(engine, stuck).status == JobStatus.running


def test_redis_down_skips_the_pass_without_raising(engine, settings: Settings) -> None:
    lost = _job(engine)
    down = queue.connect("redis://127.0.0.1:1/0")
    out = reconcile(engine, down, settings)
    assert out.requeued == [] and _get(engine, lost).status == JobStatus.queued


def test_the_heartbeat_stamps_a_running_job(engine) -> None:
    job_id = _job(engine, status=JobStatus.running, attempts=1)
    before = _get(engine, job_id).heartbeat_at
    with Heartbeat(engine, job_id, interval_s=0.2):
        time.sleep(1)
    after = _get(engine, job_id).heartbeat_at
    assert after is not None and after.replace(tzinfo=None) > before.replace(tzinfo=None) + timedelta(seconds=3000)
