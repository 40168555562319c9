"""The enqueue side of the job queue (RQ on Redis). The queue carries job ids; the database carries
the truth. The job function is named by its dotted path, so the API never imports worker code."""

from __future__ import annotations

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus

from server.errors import QueueUnavailable

JOB_FUNCTION = "worker.jobs.run_job"
CANCEL_KEY = "inco:cancel:{}"
CANCEL_TTL_S = 7 * 24 * 3600


def connect(url: str) -> Redis:
    return Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10, health_check_interval=30)


def ping(redis: Redis) -> None:
    try:
        redis.ping()
    except RedisError as exc:
        raise QueueUnavailable(f"Redis unreachable: {exc}") from exc


def queue(redis: Redis, name: str) -> Queue:
    return Queue(name, connection=redis)


def enqueue(
    redis: Redis,
    *,
    queue_name: str,
    job_id: str,
    depends_on: str | None = None,
    retries: int = 2,
    timeout_s: int = 7 * 24 * 3600,
    at_front: bool = False,
) -> None:
    """Queue ``job_id``. ``retries``: how often a job whose worker died is run again (it resumes from
    its last checkpoint; a retry goes to the front of the queue, as does a job queued ``at_front``). A
    job that depends on another runs after that one finished."""
    dependency = None
    if depends_on is not None:
        try:
            dependency = RQJob.fetch(depends_on, connection=redis)
        except NoSuchJobError:
            dependency = None  # it finished and expired from Redis: nothing to wait for
        except RedisError as exc:
            raise QueueUnavailable(f"Redis unreachable: {exc}") from exc
    try:
        queue(redis, queue_name).enqueue(
            JOB_FUNCTION,
            job_id,
            job_id=job_id,
            depends_on=dependency,
            retry=Retry(max=retries, enqueue_at_front=True) if retries else None,
            at_front=at_front,
            job_timeout=timeout_s,
            result_ttl=24 * 3600,
            failure_ttl=7 * 24 * 3600,
            description=f"inco job {job_id}",
        )
    except RedisError as exc:
        raise QueueUnavailable(f"Redis unreachable, the job was not queued: {exc}") from exc


def request_cancel(redis: Redis, *, job_id: str) -> None:
    """Flag a job for cancellation (a running job's training checks the flag every step) and take it
    off the queue if it has not started."""
    try:
        redis.set(CANCEL_KEY.format(job_id), "1", ex=CANCEL_TTL_S)
        try:
            rq_job = RQJob.fetch(job_id, connection=redis)
            if rq_job.get_status() in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
                rq_job.cancel()
        except (NoSuchJobError, InvalidJobOperation):
            pass
    except RedisError as exc:
        raise QueueUnavailable(f"Redis unreachable: {exc}") from exc


def cancel_requested(redis: Redis, *, job_id: str) -> bool:
    return bool(redis.exists(CANCEL_KEY.format(job_id)))


def depth(redis: Redis, queue_name: str) -> int:
    return queue(redis, queue_name).count
