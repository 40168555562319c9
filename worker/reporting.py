"""What training inside Ray hands to the store: per-epoch metrics, stages, logs, cancel checks, and
pretrained backbones kept in the artifact store for reuse."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from inco_core.progress import EpochLog
from server import queue
from server.errors import Canceled
from server.settings import Settings
from server.store import access
from server.store.db import make_engine, session_scope
from server.store.models import Artifact

if TYPE_CHECKING:
    from inco_core.experiment import PretrainInfo

log = logging.getLogger("inco.worker")
T = TypeVar("T")
CANCEL_POLL_S = 0.5


def connect_store() -> tuple[Engine, Redis]:
    """The store and Redis of this process's ``INCO_`` environment. Ray workers get it from the job's
    runtime environment (:func:`worker.jobs.ray_runtime_env`), so no URL (which may hold a password)
    travels in a Ray config that Ray Train or Ray Tune might write to disk."""
    settings = Settings()
    return make_engine(settings.db_url), queue.connect(settings.redis_url)


STORE_RETRY_S = 300.0  # how long a write waits for a store that is down before the attempt fails


def with_retries(fn: Callable[[], T], *, what: str, budget_s: float | None = None, delay_s: float = 0.5) -> T:
    """Run a store write, retrying with backoff (0.5 s doubling to 10 s) while the database is down,
    restarting or locked, for up to ``budget_s`` (default :data:`STORE_RETRY_S`); then the error
    propagates and the queue's retry takes over."""
    deadline = time.monotonic() + (STORE_RETRY_S if budget_s is None else budget_s)
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except SQLAlchemyError as exc:
            wait = min(delay_s * 2 ** (attempt - 1), 10.0)
            if time.monotonic() + wait > deadline:
                raise
            log.warning("%s not stored (%s), retry %d in %.1f s", what, exc.__class__.__name__, attempt, wait)
            time.sleep(wait)


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class StoreReporter:
    """A :class:`~inco_core.progress.Reporter` for one rank of a job's training.

    Every rank checks the cancel flag (so all stop together); rank 0 writes stages, per-epoch
    metrics and log lines to the store.
    """

    def __init__(self, engine: Engine, redis: Redis, *, job_id: str, rank: int = 0) -> None:
        self.engine, self.redis, self.job_id, self.rank = engine, redis, job_id, rank
        self._next_poll = 0.0

    def check_cancel(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_poll:
            return
        self._next_poll = now + CANCEL_POLL_S
        try:
            flagged = queue.cancel_requested(self.redis, job_id=self.job_id)
        except RedisError as exc:  # the flag cannot be read: keep training, try again later
            log.warning("cannot read the cancel flag of %s: %s", self.job_id, exc)
            return
        if flagged:
            raise Canceled(f"job {self.job_id} was canceled")

    def _write(self, what: str, fn: Callable[..., None], **kw: object) -> None:
        if self.rank != 0:
            return

        def go() -> None:
            with session_scope(self.engine) as s:
                fn(s, job_id=self.job_id, **kw)

        with_retries(go, what=what)

    def stage_start(self, stage: str, total_steps: int) -> None:
        self.check_cancel(force=True)
        self._write("stage", access.set_stage, stage=stage)
        self._write("log", access.add_log, message=f"{stage}: started ({total_steps} steps)")

    def step(self, stage: str, logs: dict[str, float]) -> None:
        self.check_cancel()

    def epoch_end(self, log_: EpochLog) -> None:
        self._write("metric", access.add_metric, log=log_)
        self._write(
            "log", access.add_log, message=f"{log_.stage}: epoch {log_.epoch}/{log_.epochs}  {_fmt(log_.metrics)}"
        )

    def stage_end(self, stage: str) -> None:
        self._write("log", access.add_log, message=f"{stage}: done")


class StoreBackbones:
    """:class:`~inco_core.experiment.BackboneStore` over the artifact store and the ``artifacts``
    table: a team's backbone trained once is found again by its pretrain key."""

    def __init__(self, engine: Engine, *, team_id: int, job_id: str, folder: Path) -> None:
        self.engine, self.team_id, self.job_id, self.folder = engine, team_id, job_id, Path(folder)

    def find(self, method: str, key: str) -> Path | None:
        with session_scope(self.engine) as s:
            art = access.find_artifact(s, team_id=self.team_id, kind="backbone", key=key)
        if art is None or not Path(art.path).exists():
            return None
        if art.job_id != self.job_id:
            with session_scope(self.engine) as s:
                access.add_log(s, job_id=self.job_id, message=f"reusing backbone {key} pretrained by job {art.job_id}")
        return Path(art.path)

    def add(self, method: str, key: str, checkpoint: Path, info: PretrainInfo) -> None:
        dest = self.folder / f"{method}-{key}.pt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copy2(checkpoint, tmp)
            tmp.replace(dest)

        def go() -> None:
            with session_scope(self.engine) as s:
                access.add_artifact(
                    s,
                    artifact=Artifact(
                        team_id=self.team_id,
                        job_id=self.job_id,
                        kind="backbone",
                        key=key,
                        method=method,
                        seed=info.seed,
                        path=str(dest),
                        size_bytes=dest.stat().st_size,
                        meta={"images": info.images, "wall_time_s": info.wall_time_s},
                    ),
                )

        with_retries(go, what="backbone artifact")
