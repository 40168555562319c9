"""A running job's lease: the one process that runs a job holds it, so no job runs twice at once and a
job whose process died is known to be dead within seconds.

The work horse that runs job J holds ``inco:lease:J`` in Redis, a key whose value names it
(``host:pid``) and that lapses ``INCO_LEASE_S`` after its last renewal. :class:`JobLease` takes the key
before the attempt starts (waiting while a dying holder's lease runs out) and, from a thread, renews it
and stamps the job's ``heartbeat_at`` in the store every third of the lease. A job is taken to be dead
(:func:`worker.recovery.reclaim`) only when both lapsed: its lease is gone from Redis *and* its store
heartbeat is older than the lease. A Redis outage alone (the lease lapses, the store stamps go on) or a
store outage alone (the other way round) never moves a job.

Fencing: when the renewal finds the key held by another process, or the store shows a later attempt
of the job (both only happen after the two lapsed together, e.g. a machine cut off from Redis and the
store at once), the old holder kills its own process at once, and with it the Ray job it drives.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from server.store import access
from server.store.db import session_scope

log = logging.getLogger("inco.worker")
LEASE_KEY = "inco:lease:{}"

# take or renew: set when free or already ours; 0 when another process holds it
_TAKE = """
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# give back: delete only when ours
_GIVE_BACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lease_key(job_id: str) -> str:
    return LEASE_KEY.format(job_id)


def owner_name(pid: int | None = None) -> str:
    """How a lease names its holder: ``host:pid``."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def holder(redis: Redis, job_id: str) -> str | None:
    """Who holds the job's lease now, or None when nobody does."""
    value = redis.get(lease_key(job_id))
    return value.decode() if isinstance(value, bytes) else value


def take(redis: Redis, job_id: str, owner: str, lease_s: float) -> bool:
    """Take the lease, or renew it when ``owner`` has it; False when another process holds it."""
    return bool(redis.eval(_TAKE, 1, lease_key(job_id), owner, int(lease_s * 1000)))


def give_back(redis: Redis, job_id: str, owner: str) -> bool:
    """Delete the lease if ``owner`` holds it (a finished attempt, or a work horse known to be dead)."""
    return bool(redis.eval(_GIVE_BACK, 1, lease_key(job_id), owner))


def _kill_self(reason: str) -> None:
    log.error("stopping this attempt at once: %s", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class JobLease:
    """The lease of one attempt of a job, held by the calling process (see the module doc).

    ``with JobLease(...) as lease`` takes it (:meth:`take`, waiting up to ``wait_s`` for a lapsing
    one), ``lease.attempt = n`` once the store counted the attempt turns on the store-side fence, and
    leaving the block stops the renewals and gives the lease back."""

    def __init__(
        self,
        redis: Redis,
        engine: Any,
        job_id: str,
        *,
        lease_s: float,
        on_lost: Callable[[str], None] = _kill_self,
        owner: str | None = None,
    ) -> None:
        self.redis, self.engine, self.job_id, self.lease_s = redis, engine, job_id, lease_s
        self.owner = owner or owner_name()
        self.attempt: int | None = None
        self.on_lost = on_lost
        self.held = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{job_id}", daemon=True)

    def take(self, wait_s: float) -> bool:
        """Take the lease, waiting up to ``wait_s`` while another holder's lease runs out. False when
        another process still holds it then (it renews it: the job runs elsewhere)."""
        deadline = time.monotonic() + wait_s
        while True:
            if take(self.redis, self.job_id, self.owner, self.lease_s):
                self.held = True
                self._thread.start()
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.25, self.lease_s / 10))

    def _renew(self) -> None:
        every = self.lease_s / 3
        while not self._stop.wait(every):
            try:
                if not take(self.redis, self.job_id, self.owner, self.lease_s):
                    self.on_lost(f"the lease of job {self.job_id} is held by {holder(self.redis, self.job_id)}")
                    return
            except RedisError as exc:  # Redis is away: the store stamps below keep the job alive
                log.warning("lease of %s not renewed: %s", self.job_id, exc.__class__.__name__)
            try:
                with session_scope(self.engine) as s:
                    current = access.touch_job(s, job_id=self.job_id)
                if self.attempt is not None and current is not None and current > self.attempt:
                    self.on_lost(f"attempt {current} of job {self.job_id} started elsewhere (this is {self.attempt})")
                    return
            except SQLAlchemyError as exc:
                log.warning("heartbeat of %s not stored: %s", self.job_id, exc.__class__.__name__)

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.held:
            try:
                give_back(self.redis, self.job_id, self.owner)
            except RedisError as exc:  # it lapses by itself
                log.warning("lease of %s not given back: %s", self.job_id, exc.__class__.__name__)
            self.held = False

    def __enter__(self) -> JobLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
