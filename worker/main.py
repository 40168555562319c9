"""``inco worker``: take jobs from the Redis queue and run them on Ray.

Each job runs in a forked work horse (RQ's default), so a crash or a kill of one job never takes
the worker down, and RQ's heartbeat tells a dead worker apart from a long job. The worker connects to
``RAY_ADDRESS`` when it is set; otherwise it starts a local Ray head for its lifetime (and a new one
before the next job when that one died).
"""

from __future__ import annotations

import contextlib
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
from rq.exceptions import StopRequested

from server import queue
from server.errors import ServiceUnavailable
from server.logs import setup_logging
from server.settings import Settings
from server.store import access
from server.store.db import make_engine, schema_is_current, session_scope
from server.store.models import Job, JobStatus
from worker.lease import give_back, holder, owner_name
from worker.priority import lower_priority
from worker.recovery import Watchdog, reconcile

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


RAY_STARTED = b"Ray runtime started."  # what `ray start` prints once every process of the head is up
RAY_START_S = 300  # a head on a loaded machine: Ray's own dashboard wait is raised to fit in this
RAY_SETTLE_S = 3  # a head still there this long after it said it started stays up


def start_local_ray(
    home: Path,
    *,
    num_cpus: int | None = None,
    nice: int = 0,
    dashboard: bool = False,
    timeout_s: float = RAY_START_S,
    tries: int = 3,
) -> tuple[subprocess.Popen[bytes], str]:
    """A Ray head on loopback that lives as long as the returned process (``ray start --block``); it
    and the training processes it starts run at CPU priority ``nice`` at least (INCO_WORKER_NICE).
    With ``dashboard`` (INCO_RAY_DASHBOARD) it runs the Ray dashboard on loopback, on a free port
    that the log names; without it the head saves the dashboard's modules (a dozen processes: about
    6 CPU-seconds more to start on 2 cores, bench/results/ray-run-cost.md, and more while they serve).

    Returns once ``ray start`` says the whole head is up (GCS, raylet, dashboard) and the head is
    still there a moment later, not when its GCS port first answers: on a busy machine the dashboard
    can take over a minute to start, and a head whose dashboard missed Ray's deadline
    (``RAY_DASHBOARD_STARTUP_TIMEOUT_S``, 60 s, raised to ``timeout_s`` here unless it is set) is
    ended by ``ray start`` itself, after its port answered. Such a start is tried again, ``tries``
    times in all."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if ray_bin is None:
        raise ServiceUnavailable("the ray command is not installed: pip install 'ray[train,tune]'")
    for attempt in range(1, tries + 1):
        try:
            return _start_head(ray_bin, home, num_cpus=num_cpus, nice=nice, dashboard=dashboard, timeout_s=timeout_s)
        except ServiceUnavailable as exc:
            if attempt == tries:
                raise
            log.warning("the local Ray head did not start (%s): trying again", exc)
    raise AssertionError("unreachable")


def _start_head(
    ray_bin: str, home: Path, *, num_cpus: int | None, nice: int, dashboard: bool, timeout_s: float
) -> tuple[subprocess.Popen[bytes], str]:
    port, dashboard_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    # RAY_ADDRESS: every Ray process of this head (they inherit its environment) knows its own cluster.
    # Without it, Ray Train's placement-group cleaner looks the cluster up, takes the newest Ray head on
    # the machine when there are several, fails on that one's token, and the CPUs of every trial ASHA
    # stopped stay held: a search stalls
    env = {**os.environ, **ray_env(home), "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": address}
    # Ray Train's preemption watcher (an actor per training run) waits for the cloud to announce that a
    # node goes away; a head on this machine has no such node to watch
    env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", str(int(timeout_s)))
    cmd = [
        # lower the priority before `ray start` execs, so every process of the head inherits it
        *([sys.executable, "-m", "worker.priority", str(nice)] if nice > 0 else []),
        ray_bin,
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        # the service needs no dashboard: it stores its own metrics, and frees what a dead Train
        # controller held without Ray's state API (worker.placement.free_orphaned_placement_groups)
        f"--include-dashboard={str(dashboard).lower()}",
        # the log monitor streams workers' output to drivers that ask for it; a job's driver does not
        # (log_to_driver=False: its workers report to the store), and the logs stay in Ray's session folder
        "--include-log-monitor=false",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        # Ray Client's server (unused here) on a port of its own, not every head on the machine on 10001
        f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
        f"--num-cpus={num_cpus or os.cpu_count() or 1}",
    ]
    (home / "logs").mkdir(parents=True, exist_ok=True)
    log_path = home / "logs" / f"ray-{port}.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with open(log_path, "rb") as logf:
            logf.seek(start)
            if RAY_STARTED in logf.read():
                # `ray start --block` checks its processes every second and ends the head when one died
                time.sleep(RAY_SETTLE_S)
                if proc.poll() is None:
                    if dashboard:
                        log.info("the Ray dashboard of %s: http://127.0.0.1:%d", address, dashboard_port)
                    return proc, address
                break
        time.sleep(0.5)
    else:
        stop_local_ray(proc)
        raise ServiceUnavailable(f"the local Ray head did not start within {timeout_s:.0f} s; see {log_path}")
    with contextlib.suppress(OSError):  # what is left of its processes
        os.killpg(proc.pid, signal.SIGKILL)
    raise ServiceUnavailable(f"ray start exited with {proc.returncode}; see {log_path}")


def stop_local_ray(proc: subprocess.Popen[bytes], *, grace_s: float = 5) -> None:
    """Stop a head from :func:`start_local_ray`: SIGTERM, then after ``grace_s`` SIGKILL to its whole
    process group (its GCS and raylet; a ``ray start --block`` takes about 35 s to exit on its own)."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class LocalRay:
    """The Ray head a worker starts for itself when ``RAY_ADDRESS`` is not set: its address goes into
    this process's environment (the work horses it forks inherit it), and :meth:`ensure`, called
    before each job, starts a new head when this one died (a crash, the OOM killer), so no job is sent
    to a cluster that is gone."""

    def __init__(self, home: Path, nice: int, *, dashboard: bool = False) -> None:
        self.home, self.nice, self.dashboard = home, nice, dashboard
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc, address = start_local_ray(self.home, nice=self.nice, dashboard=self.dashboard)
        os.environ.update(ray_env(self.home))
        os.environ["RAY_ADDRESS"] = address
        log.info("started a local Ray head at %s", address)

    def ensure(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None:
            code = self.proc.returncode
            log.error("the local Ray head (pid %d) exited with %s: starting a new one", self.proc.pid, code)
            with contextlib.suppress(OSError):  # what is left of its process group
                os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.start()
        except ServiceUnavailable as exc:  # the job's attempt fails on it and is retried
            log.error("no local Ray head: %s", exc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_local_ray(self.proc, grace_s=30)


def mark_failed_when_retries_run_out(job: Any, exc_type: Any, exc_value: Any, tb: Any) -> bool:
    """RQ exception handler (work horse killed, timed out, or abandoned): once no retry is left, the
    stored job ends ``failed`` with the reason; before that it stays running and is re-run."""
    if job.retries_left:
        return True
    try:
        owner = holder(job.connection, job.id)
    except RedisError:
        owner = None
    if owner is not None:
        # RQ fails a job when any of its executions in the started registry expired, even one left by
        # a worker that died while another process now runs the job: that process holds the lease and
        # renews it, so the job lives. (If it does not, the lease lapses and reclaim ends the job.)
        why = exc_type.__name__
        log.warning("job %s: RQ took it for abandoned (%s), but %s runs it: not failed", job.id, why, owner)
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


EXCEPTION_HANDLERS = [mark_failed_when_retries_run_out]


class InCoWorker(Worker):
    """An RQ worker whose maintenance pass also reconciles the store with the queue
    (:func:`worker.recovery.reconcile`), so a job Redis lost is queued again, and that gives back the
    lease of a work horse it saw die, so the job's retry starts at once."""

    inco_settings: Settings
    inco_engine: Any
    inco_stop: StopSignal | None = None
    inco_ray: LocalRay | None = None

    def fork_work_horse(self, job: Any, queue: Any) -> None:
        if self.inco_ray is not None:  # the work horse connects to it: a dead one is started again first
            self.inco_ray.ensure()
        super().fork_work_horse(job, queue)

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()
        if self.inco_stop:  # asked while RQ was starting (its scheduler forked, no handler yet): stop now
            self._stop_requested = True

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        reconcile(self.inco_engine, self.connection, self.inco_settings, EXCEPTION_HANDLERS)
        if self._shutdown_requested_date is not None:  # RQ raised the stop inside a store call, which took it
            raise StopRequested  # for a database error: its loop ends on this

    def stop_scheduler(self) -> None:
        """RQ's: SIGTERM to the scheduler process, then wait; a scheduler forked an instant before (the
        signal can be lost in Python's after-fork reset) is killed after 5 s instead of waited for forever."""
        process = self.scheduler._process if self.scheduler else None
        if process is None or not process.pid:
            return
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGTERM)
        process.join(5)
        if process.is_alive():
            log.warning("RQ's scheduler process %d did not stop on SIGTERM: killed", process.pid)
            process.kill()
            process.join(5)

    def handle_work_horse_killed(self, job: Any, retpid: int, ret_val: int, rusage: Any) -> None:
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        try:
            if give_back(self.connection, job.id, owner_name(retpid)):
                log.warning("work horse %d of job %s died; its lease is given back for the retry", retpid, job.id)
        except RedisError as exc:  # the lease lapses by itself
            log.warning("lease of %s not given back: %s", job.id, exc.__class__.__name__)


class StopSignal:
    """SIGTERM/SIGINT that come while RQ's own handlers are not in place (the worker starting, waiting
    for its store or Redis, starting RQ): remembered and honoured at the next step, instead of the
    default of ending the process half-way, which left RQ's scheduler process or the local Ray head
    behind."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.pid = os.getpid()

    def __call__(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a child forked before it set its own (RQ's scheduler): the default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        log.info("stop requested (signal %d)", signum)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)

    def __bool__(self) -> bool:
        return self.signum is not None


def run_worker(settings: Settings, *, burst: bool = False, name: str | None = None) -> None:
    """Serve the queue until stopped (or, with ``burst``, until it is empty)."""
    if not logging.getLogger().handlers:  # `inco worker` set it up already; RQ's own setup would be plain text
        setup_logging(settings.log_format)
    if settings.worker_nice:
        log.info("running at CPU priority nice %d (INCO_WORKER_NICE)", lower_priority(settings.worker_nice))
    stop = StopSignal()
    stop.install()
    engine = make_engine(settings.db_url)
    redis = queue.connect(settings.redis_url)
    local_ray = None
    try:
        where = f"{engine.url!r} at the newest schema (inco serve migrates it)"
        if not wait_for("the store", lambda: schema_is_current(engine), where, stop=stop):
            return
        if not wait_for("Redis", lambda: redis.ping(), settings.redis_url.rsplit("@", 1)[-1], stop=stop):
            return
        if not os.environ.get("RAY_ADDRESS"):
            local_ray = LocalRay(settings.home, settings.worker_nice, dashboard=settings.ray_dashboard)
            local_ray.start()
        # torch, Ray and Ray Train load here once, not in every work horse: forked with them, a horse starts
        # its job seconds sooner, and never holds the GIL for seconds loading their libraries while its
        # lease thread needs it (a lease that lapses for that looks like a dead job to other workers)
        import worker.training

        for serving in itertools.count():
            stop.install()  # RQ's handlers of the last round are bound to a worker that quit
            if stop:
                break
            worker = InCoWorker(
                [settings.queue],
                connection=redis,
                # a new name after a lost Redis: the old one may still be registered (Redis kept it in its AOF)
                name=(name or f"inco-{socket.gethostname()}-{os.getpid()}") + (f"-{serving}" if serving else ""),
                exception_handlers=EXCEPTION_HANDLERS,
                job_monitoring_interval=settings.heartbeat_s,
                maintenance_interval=settings.maintenance_s,
                worker_ttl=settings.maintenance_s + 15,  # an idle worker waits this - 15 s for a job, then maintains
            )
            worker.inco_settings, worker.inco_engine, worker.inco_stop = settings, engine, stop
            worker.inco_ray = local_ray
            reconcile(engine, redis, settings, EXCEPTION_HANDLERS)
            try:
                every_s = min(1.0, settings.lease_s / 4)
                with Watchdog(engine, redis, settings, EXCEPTION_HANDLERS, every_s=every_s, worker_name=worker.name):
                    worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
            except RedisError as exc:  # RQ quits when Redis goes away (even mid-job) and then fails to say so
                log.warning("lost Redis: %s", exc)
            except StopRequested:  # a stop in the instant between RQ's handlers and its loop skipped its teardown
                worker.teardown()
                break
            # a stop (SIGTERM/SIGINT) sets the shutdown date; RQ sets _stop_requested only when it came mid-job
            if burst or stop or worker._stop_requested or worker._shutdown_requested_date is not None:
                break
            # RQ quit on an error (Redis went away while a job ran: its work horse carries on and reports to
            # Redis once it is back): wait for Redis, then serve the queue again instead of exiting
            stop.install()
            wait_for("Redis", lambda: redis.ping(), settings.redis_url.rsplit("@", 1)[-1], stop=stop)
    finally:
        engine.dispose()
        if local_ray is not None:
            local_ray.stop()


def wait_for(what: str, ready: Any, where: str, every_s: float = 2.0, stop: StopSignal | None = None) -> bool:
    """Poll ``ready()`` until it is true, logging every 30 s: a worker whose store or Redis is down
    waits for it instead of exiting (and being restarted in a loop by its supervisor). False when a
    stop was requested meanwhile."""
    said = 0.0
    while not stop:
        try:
            if ready():
                return True
            why = "not ready"
        except Exception as exc:
            why = f"{exc.__class__.__name__}"
        if time.monotonic() - said > 30:
            log.warning("waiting for %s (%s): %s", what, where, why)
            said = time.monotonic()
        time.sleep(every_s)
    return False
