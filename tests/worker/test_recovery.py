"""Recovery (worker/recovery.py) and job leases (worker/lease.py) against real Redis and the store on
SQLite and PostgreSQL: queued rows Redis lost are queued again; a running job whose lease and store
heartbeat both lapsed is queued again (through RQ's abandoned-job path when RQ still tracks it as
started) or fails once its retry budget is spent; a job whose lease or heartbeat is alive is left
alone; a lease is held by one process at a time, and an attempt that lost it stops."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from redis import Redis
from rq import Queue
from rq.executions import Execution
from rq.job import Job as RQJob
from rq.job import JobStatus as RQStatus
from rq.registry import StartedJobRegistry
from rq.utils import utcformat

from server import queue
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from server.store.models import Job, JobCreate, JobStatus, utcnow
from worker.lease import JobLease, holder, lease_key, owner_name, take
from worker.main import EXCEPTION_HANDLERS
from worker.recovery import QUEUE_GRACE_S, WORKER_ALIVE_KEY, reclaim, reconcile

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
    stuck = _job(engine, status=JobStatus.running, attempts=1, age_s=settings.lease_s + 60)
    beating = _job(engine, status=JobStatus.running, attempts=1, age_s=settings.lease_s / 3)
    out = reconcile(engine, redis_db, settings)
    assert out.requeued == [stuck]
    job = _get(engine, stuck)
    assert job.status == JobStatus.queued and job.worker is None and job.attempts == 1
    rq_job = RQJob.fetch(stuck, connection=redis_db)
    assert rq_job.retries_left == settings.job_retries - 1  # the attempt it already spent counts
    assert _get(engine, beating).status == JobStatus.running and beating not in _queued_ids(redis_db, settings)


def test_a_job_whose_lease_is_alive_is_left_alone(engine, redis_db: Redis, settings: Settings) -> None:
    """The store heartbeat alone is stale (the store was down for the process that runs it): its lease
    in Redis says it is alive, so nothing moves."""
    job_id = _job(engine, status=JobStatus.running, attempts=1, age_s=settings.lease_s + 60)
    assert take(redis_db, job_id, "elsewhere:1", settings.lease_s)
    assert reclaim(engine, redis_db, settings).requeued == []
    assert _get(engine, job_id).status == JobStatus.running and _queued_ids(redis_db, settings) == []


def _started_by_dead_worker(redis: Redis, settings: Settings, job_id: str, started_s_ago: float = 60) -> None:
    """What RQ holds for a job whose worker died mid-run: status started, an execution in the started
    registry that RQ itself would only give up after its heartbeat TTL (here 10 minutes)."""
    queue.enqueue(redis, queue_name=settings.queue, job_id=job_id, retries=settings.job_retries)
    rq_job = RQJob.fetch(job_id, connection=redis)
    Queue(settings.queue, connection=redis).remove(rq_job)
    with redis.pipeline() as p:
        Execution.create(rq_job, ttl=600, pipeline=p, worker_name="dead-worker")
        rq_job.prepare_for_execution("dead-worker", p)
        p.execute()
    assert rq_job.get_status() == RQStatus.STARTED
    if started_s_ago:  # RQ's own clock of the execution
        redis.hset(rq_job.key, "started_at", utcformat(utcnow() - timedelta(seconds=started_s_ago)))


def test_a_started_job_whose_worker_died_is_retried_at_once_at_the_front(
    engine, redis_db: Redis, settings: Settings
) -> None:
    waiting = _job(engine, age_s=1)
    queue.enqueue(redis_db, queue_name=settings.queue, job_id=waiting)
    dead = _job(engine, status=JobStatus.running, attempts=1, age_s=settings.lease_s + 1)
    _started_by_dead_worker(redis_db, settings, dead)
    out = reclaim(engine, redis_db, settings, EXCEPTION_HANDLERS)
    assert out.requeued == [dead]
    rq_job = RQJob.fetch(dead, connection=redis_db)
    assert rq_job.get_status() == RQStatus.QUEUED and rq_job.retries_left == settings.job_retries - 1
    assert _queued_ids(redis_db, settings) == [dead, waiting]  # a retry goes first
    with session_scope(engine) as s:
        assert any("no lease" in m.message for m in access.list_logs(s, job_id=dead))
    assert reclaim(engine, redis_db, settings, EXCEPTION_HANDLERS).requeued == []  # once only
    assert not redis_db.exists(Queue(settings.queue, connection=redis_db).registry_cleaning_key)


def test_a_job_a_work_horse_was_just_given_is_left_alone(engine, redis_db: Redis, settings: Settings) -> None:
    """RQ started it a moment ago: its work horse has not taken the lease yet (the row is still that of
    the attempt before, without a fresh heartbeat)."""
    job_id = _job(engine, status=JobStatus.running, attempts=1, age_s=settings.lease_s + 60)
    _started_by_dead_worker(redis_db, settings, job_id, started_s_ago=0)
    assert reclaim(engine, redis_db, settings, EXCEPTION_HANDLERS).requeued == []
    assert RQJob.fetch(job_id, connection=redis_db).get_status() == RQStatus.STARTED


def test_a_job_whose_worker_lives_is_left_to_it(engine, redis_db: Redis, settings: Settings) -> None:
    """Lease and store heartbeat lapsed (its work horse is slow, busy starting on a loaded machine), but
    the worker RQ gave it to keeps its liveness key: that worker, not another, decides."""
    job_id = _job(engine, status=JobStatus.running, attempts=1, age_s=settings.lease_s + 60)
    _started_by_dead_worker(redis_db, settings, job_id)
    redis_db.set(WORKER_ALIVE_KEY.format("dead-worker"), 1, px=5000)  # it was not dead after all
    assert reclaim(engine, redis_db, settings, EXCEPTION_HANDLERS).requeued == []
    redis_db.delete(WORKER_ALIVE_KEY.format("dead-worker"))
    assert reclaim(engine, redis_db, settings, EXCEPTION_HANDLERS).requeued == [job_id]


def test_a_started_job_with_no_retry_left_fails_in_the_store(
    engine, redis_db: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INCO_DATABASE_URL", settings.db_url)  # RQ's exception handler reads the worker's settings
    settings = settings.model_copy(update={"job_retries": 0})
    dead = _job(engine, status=JobStatus.running, attempts=1, age_s=settings.lease_s + 1)
    _started_by_dead_worker(redis_db, settings, dead)
    reclaim(engine, redis_db, settings, EXCEPTION_HANDLERS)
    job = _get(engine, dead)
    assert job.status == JobStatus.failed and "no retry left" in job.error, job.error
    assert _queued_ids(redis_db, settings) == []


def test_a_stale_execution_of_a_job_another_process_runs_does_not_fail_it(
    engine, redis_db: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RQ's registry cleaning fails a job when any execution of it expired, also one left by a worker
    that died while another process runs the job now (seen under load, on the last retry): the lease
    shows the job lives, so the store keeps it running; once nobody holds the lease, reclaim ends it."""
    monkeypatch.setenv("INCO_DATABASE_URL", settings.db_url)  # RQ's exception handler reads the worker's settings
    settings = settings.model_copy(update={"job_retries": 0})
    job_id = _job(engine, status=JobStatus.running, attempts=1, age_s=0)
    _started_by_dead_worker(redis_db, settings, job_id)
    assert take(redis_db, job_id, "other-machine:4242", settings.lease_s)  # the process that runs it now
    registry = StartedJobRegistry(queue=Queue(settings.queue, connection=redis_db))
    registry.cleanup(timestamp=time.time() + 3600, exception_handlers=EXCEPTION_HANDLERS)  # every execution expired
    assert RQJob.fetch(job_id, connection=redis_db).get_status() == RQStatus.FAILED  # RQ's view
    assert _get(engine, job_id).status == JobStatus.running  # the store's: it runs
    redis_db.delete(lease_key(job_id))  # that process died too: no lease, no heartbeat
    with session_scope(engine) as s:
        s.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=settings.lease_s + 1)
    assert reclaim(engine, redis_db, settings, EXCEPTION_HANDLERS).failed == [job_id]
    assert "spent the retry budget" in _get(engine, job_id).error


def test_reclaim_waits_while_rq_cleans_its_registries(engine, redis_db: Redis, settings: Settings) -> None:
    """RQ's own registry cleaning holds its maintenance lock: the pass leaves the job to the next pass
    rather than both handling it."""
    dead = _job(engine, status=JobStatus.running, attempts=1, age_s=settings.lease_s + 1)
    _started_by_dead_worker(redis_db, settings, dead)
    lock = Queue(settings.queue, connection=redis_db).registry_cleaning_key
    redis_db.set(lock, 1, ex=899)
    assert reclaim(engine, redis_db, settings, EXCEPTION_HANDLERS).requeued == []
    assert RQJob.fetch(dead, connection=redis_db).get_status() == RQStatus.STARTED
    redis_db.expire(lock, 899 - 120)  # held for two minutes: left behind by a worker that died in its pass
    assert reclaim(engine, redis_db, settings, EXCEPTION_HANDLERS).requeued == [dead]


def test_a_stuck_job_past_its_retry_budget_fails_with_the_last_error(
    engine, redis_db: Redis, settings: Settings
) -> None:
    stuck = _job(
        engine,
        status=JobStatus.running,
        attempts=settings.job_retries + 1,
        age_s=settings.lease_s + 60,
        error="RuntimeError: CUDA error: an illegal memory access",
    )
    out = reconcile(engine, redis_db, settings)
    assert out.failed == [stuck] and out.requeued == []
    job = _get(engine, stuck)
    assert job.status == JobStatus.failed
    assert "spent the retry budget" in job.error and "last error: RuntimeError: CUDA error" in job.error
    assert _queued_ids(redis_db, settings) == []


def test_jobs_rq_still_tracks_are_left_to_rq(engine, redis_db: Redis, settings: Settings) -> None:
    stuck = _job(engine, status=JobStatus.running, attempts=1, age_s=settings.lease_s + 60)
    queue.enqueue(redis_db, queue_name=settings.queue, job_id=stuck)  # RQ will run it (again) itself
    assert reconcile(engine, redis_db, settings).requeued == []
    assert _get(engine, stuck).status == JobStatus.running


def test_redis_down_skips_the_pass_without_raising(engine, settings: Settings) -> None:
    lost = _job(engine)
    down = queue.connect("redis://127.0.0.1:1/0")
    out = reconcile(engine, down, settings)
    assert out.requeued == [] and _get(engine, lost).status == JobStatus.queued
    assert out.skipped is not None and out.skipped.startswith("ConnectionError: ") and "\n" not in out.skipped


def test_a_lease_is_held_renewed_and_given_back(engine, redis_db: Redis) -> None:
    job_id = _job(engine, status=JobStatus.running, attempts=1)
    before = _get(engine, job_id).heartbeat_at
    lost: list[str] = []
    with JobLease(redis_db, engine, job_id, lease_s=1.5, on_lost=lost.append) as lease:
        assert lease.take(wait_s=0) and holder(redis_db, job_id) == owner_name()
        rival = JobLease(redis_db, engine, job_id, lease_s=1.5, on_lost=lost.append, owner="elsewhere:2")
        assert not rival.take(wait_s=2.5)  # renewed all along: it never lapses
        assert 0 < redis_db.pttl(lease_key(job_id)) <= 1500
    after = _get(engine, job_id).heartbeat_at
    assert after is not None and after.replace(tzinfo=None) > before.replace(tzinfo=None) + timedelta(seconds=3000)
    assert not redis_db.exists(lease_key(job_id)) and lost == []


def test_a_lapsing_lease_of_a_dead_process_is_waited_out(engine, redis_db: Redis) -> None:
    job_id = _job(engine, status=JobStatus.running, attempts=1)
    redis_db.set(lease_key(job_id), "gone:1", px=500)
    with JobLease(redis_db, engine, job_id, lease_s=2, on_lost=lambda why: None) as lease:
        started = time.monotonic()
        assert lease.take(wait_s=3)
        assert 0.2 < time.monotonic() - started < 2


def test_an_attempt_that_lost_its_lease_stops(engine, redis_db: Redis) -> None:
    """Another process took the lease (this one was cut off from Redis and the store long enough):
    this attempt is told at its next renewal."""
    job_id = _job(engine, status=JobStatus.running, attempts=1)
    lost: list[str] = []
    with JobLease(redis_db, engine, job_id, lease_s=0.6, on_lost=lost.append) as lease:
        assert lease.take(wait_s=0)
        redis_db.set(lease_key(job_id), "elsewhere:7", px=5000)
        time.sleep(0.6)
    assert len(lost) == 1 and "held by elsewhere:7" in lost[0]


def test_an_attempt_overtaken_by_a_later_attempt_stops(engine, redis_db: Redis) -> None:
    job_id = _job(engine, status=JobStatus.running, attempts=1)
    lost: list[str] = []
    with JobLease(redis_db, engine, job_id, lease_s=0.6, on_lost=lost.append) as lease:
        assert lease.take(wait_s=0)
        lease.attempt = 1
        with session_scope(engine) as s:
            s.get(Job, job_id).attempts = 2
        time.sleep(0.6)
    assert len(lost) == 1 and "attempt 2" in lost[0]
