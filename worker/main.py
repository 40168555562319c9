"""``inco worker``: take jobs from the Redis queue and run them on Ray.

Each job runs in a forked work horse (RQ's default), so a crash or a kill of one job never takes
the worker down, and RQ's heartbeat tells a dead worker apart from a long job. The worker connects to
``RAY_ADDRESS`` when it is set; otherwise it starts a local Ray head for its lifetime.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError
from rq import Worker

from server import queue
from server.errors import ServiceUnavailable
from server.logs import setup_logging
from server.settings import Settings
from server.store import access
from server.store.db import make_engine, schema_is_current, session_scope
from server.store.models import Job, JobStatus
from worker.priority import lower_priority
from worker.recovery import reconcile

log = logging.getLogger("inco.worker")


def ray_env(home: Path) -> dict[str, str]:
    """Token authentication for a local Ray: one token per ``INCO_HOME``, readable by its owner only."""
    token_file = home / "ray-token"
    if not token_file.exists():
        home.mkdir(parents=True, exist_ok=True)
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token_file.read_text().strip()}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_local_ray(home: Path, *, num_cpus: int | None = None, nice: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    """A Ray head on loopback that lives as long as the returned process (``ray start --block``); it
    and the training processes it starts run at CPU priority ``nice`` at least (INCO_WORKER_NICE)."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if ray_bin is None:
        raise ServiceUnavailable("the ray command is not installed: pip install 'ray[train,tune]'")
    port = free_port()
    env = {**os.environ, **ray_env(home), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [
        # lower the priority before `ray start` execs, so every process of the head inherits it
        *([sys.executable, "-m", "worker.priority", str(nice)] if nice > 0 else []),
        ray_bin,
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        # the dashboard serves Ray's state API, which Ray Train's placement-group cleaner needs to
        # free the CPUs/GPUs of a trial that Ray Tune stopped early (ASHA); it listens on loopback
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--disable-usage-stats",
        f"--num-cpus={num_cpus or os.cpu_count() or 1}",
    ]
    (home / "logs").mkdir(parents=True, exist_ok=True)
    with open(home / "logs" / f"ray-{port}.log", "ab") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceUnavailable(f"ray start exited with {proc.returncode}; see {home / 'logs'}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(2)  # the GCS answers before the raylet is ready
                return proc, address
        time.sleep(0.5)
    proc.terminate()
    raise ServiceUnavailable("the local Ray head did not start within 60 s")


def stop_local_ray(proc: subprocess.Popen[bytes], *, grace_s: float = 5) -> None:
    """Stop a head from :func:`start_local_ray`: SIGTERM, then after ``grace_s`` SIGKILL to its whole
    process group (its GCS and raylet; a ``ray start --block`` takes about 35 s to exit on its own)."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def mark_failed_when_retries_run_out(job: Any, exc_type: Any, exc_value: Any, tb: Any) -> bool:
    """RQ exception handler (work horse killed, timed out, or abandoned): once no retry is left, the
    stored job ends ``failed`` with the reason; before that it stays running and is re-run."""
    if job.retries_left:
        return True
    settings = Settings()
    engine = make_engine(settings.db_url)
    try:
        with session_scope(engine) as s:
            stored = s.get(Job, job.id)
            last = f"; last error: {stored.error}" if stored is not None and stored.error else ""
            access.finish_job(
                s,
                job_id=job.id,
                status=JobStatus.failed,
                error=f"the worker running it died or timed out ({exc_type.__name__}: {exc_value}); "
                f"no retry left{last}",
            )
    finally:
        engine.dispose()
    return True


class InCoWorker(Worker):
    """An RQ worker whose maintenance pass also reconciles the store with the queue
    (:func:`worker.recovery.reconcile`), so a job Redis lost is queued again."""

    inco_settings: Settings
    inco_engine: Any

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        reconcile(self.inco_engine, self.connection, self.inco_settings)


def run_worker(settings: Settings, *, burst: bool = False, name: str | None = None) -> None:
    """Serve the queue until stopped (or, with ``burst``, until it is empty)."""
    if not logging.getLogger().handlers:  # `inco worker` set it up already; RQ's own setup would be plain text
        setup_logging(settings.log_format)
    if settings.worker_nice:
        log.info("running at CPU priority nice %d (INCO_WORKER_NICE)", lower_priority(settings.worker_nice))
    engine = make_engine(settings.db_url)
    wait_for(
        "the store", lambda: schema_is_current(engine), f"{engine.url!r} at the newest schema (inco serve migrates it)"
    )
    redis = queue.connect(settings.redis_url)
    wait_for("Redis", lambda: redis.ping(), settings.redis_url.rsplit("@", 1)[-1])
    ray_proc = None
    if not os.environ.get("RAY_ADDRESS"):
        ray_proc, address = start_local_ray(settings.home, nice=settings.worker_nice)
        os.environ.update(ray_env(settings.home))
        os.environ["RAY_ADDRESS"] = address
        log.info("started a local Ray head at %s", address)
    try:
        for serving in itertools.count():
            worker = InCoWorker(
                [settings.queue],
                connection=redis,
                # a new name after a lost Redis: the old one may still be registered (Redis kept it in its AOF)
                name=(name or f"inco-{socket.gethostname()}-{os.getpid()}") + (f"-{serving}" if serving else ""),
                exception_handlers=[mark_failed_when_retries_run_out],
                job_monitoring_interval=settings.heartbeat_s,
                maintenance_interval=settings.maintenance_s,
                worker_ttl=settings.maintenance_s + 15,  # an idle worker waits this - 15 s for a job, then maintains
            )
            worker.inco_settings, worker.inco_engine = settings, engine
            reconcile(engine, redis, settings)
            try:
                worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
            except RedisError as exc:  # RQ quits when Redis goes away (even mid-job) and then fails to say so
                log.warning("lost Redis: %s", exc)
            if burst or worker._stop_requested:
                break
            # RQ quit on an error (Redis went away while a job ran: its work horse carries on and reports to
            # Redis once it is back): wait for Redis, then serve the queue again instead of exiting
            wait_for("Redis", lambda: redis.ping(), settings.redis_url.rsplit("@", 1)[-1])
    finally:
        engine.dispose()
        if ray_proc is not None:
            stop_local_ray(ray_proc, grace_s=30)


def wait_for(what: str, ready: Any, where: str, every_s: float = 2.0) -> None:
    """Poll ``ready()`` until it is true, logging every 30 s: a worker whose store or Redis is down
    waits for it instead of exiting (and being restarted in a loop by its supervisor)."""
    said = 0.0
    while True:
        try:
            if ready():
                return
            why = "not ready"
        except Exception as exc:
            why = f"{exc.__class__.__name__}"
        if time.monotonic() - said > 30:
            log.warning("waiting for %s (%s): %s", what, where, why)
            said = time.monotonic()
        time.sleep(every_s)
