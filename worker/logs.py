"""The worker's log context: while a job runs, every log line of the work horse (its threads
included) carries the job's id and team (see :mod:`server.logs`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from server import logs
from server.store.db import session_scope
from server.store.models import Job, Team

log = logging.getLogger("inco.worker")


def team_of(engine: Any, job_id: str) -> str | None:
    """The name of the team that owns ``job_id``; None when the job or the store is not there (the
    job's own code reports that; logging must not fail because of it)."""
    try:
        with session_scope(engine) as s:
            job = s.get(Job, job_id)
            team = s.get(Team, job.team_id) if job is not None else None
            return team.name if team is not None else None
    except SQLAlchemyError as exc:
        log.warning("cannot look up the team of job %s for the log: %s", job_id, exc)
        return None


@contextmanager
def job_logging(engine: Any, job_id: str) -> Iterator[None]:
    """Bind ``job_id`` and its team to every log line for the duration of the block, which logs a
    line when it starts and one when it ends (how long it took, or the error it raised)."""
    start = time.monotonic()
    with logs.bound(job_id=job_id, team=team_of(engine, job_id)):
        log.info("job %s: work starts in process %d", job_id, os.getpid())
        try:
            yield
        except BaseException as exc:
            log.warning("job %s: work stopped after %.1f s: %s", job_id, time.monotonic() - start, type(exc).__name__)
            raise
        log.info("job %s: work ended after %.1f s", job_id, time.monotonic() - start)
