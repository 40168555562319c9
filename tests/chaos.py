"""Fault injection for the fault tests and ``bench/faults.py``: a private Redis with append-only
persistence (deploy/redis/redis.conf) that can be killed and restarted, a TCP proxy in front of
PostgreSQL whose link can be cut, and the API and worker as processes that can be ``kill -9``-ed.

Everything here is a real process or a real socket; nothing is simulated."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from cli.stack import descendants
from server.store.db import make_engine, migrate
from tests.service_fixtures import PG_ADMIN, auth, make_team, pg_host_port, scratch_database
from worker.lease import holder

REPO = Path(__file__).resolve().parents[1]
REDIS_CONF = REPO / "deploy" / "redis" / "redis.conf"
FINISHED = ("succeeded", "failed", "canceled")
SMOKE = {"spec": {"ratios": ["1:16"], "preset": "smoke", "resources": {"device": "cpu"}}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check, what: str, timeout_s: float = 30, every_s: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(every_s)


class RedisServer:
    """``redis-server`` with the deploy config (AOF, fsync always) on a port and folder of its own."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder, self.port = folder, port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = ["redis-server", str(REDIS_CONF), "--port", str(self.port), "--dir", str(self.folder)]
        cmd += ["--bind", "127.0.0.1"]
        with open(self.folder / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: Redis.from_url(self.url).ping(), f"redis-server on {self.port}", 20)

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the append-only file holds survives."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def up(self) -> bool:
        try:
            return bool(Redis.from_url(self.url, socket_connect_timeout=1).ping())
        except RedisError:
            return False


class TcpProxy:
    """A loopback TCP proxy to ``target``. :meth:`cut` drops every open connection and refuses new
    ones (the database is unreachable); :meth:`restore` lets them through again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._open = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.cuts = 0

    def start(self) -> TcpProxy:
        self._open.set()
        self._listen()
        return self

    def _listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        self._thread = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        self._thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if not self._open.is_set() or listener is not self._listener:  # cut meanwhile
                client.close()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)
        except (OSError, ValueError):  # cut() closed the sockets under us (select raises ValueError on fd -1)
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        self.cuts += 1
        self._open.clear()
        if self._listener is not None:  # new connections are refused
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            self._listener.close()
            self._listener = None
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
            self._conns.clear()

    def restore(self) -> None:
        if self._listener is None:
            self._open.set()
            self._listen()

    def close(self) -> None:
        self._stop = True
        self.cut()


def _start_time(pid: int) -> str | None:
    """When the process started (clock ticks since boot), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Process:
    """An ``inco`` command (``serve``, ``worker``) as a process group that can be killed."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", *self.args],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill9(self) -> None:
        """``kill -9`` of the process and every process under it, as when its machine goes down (an RQ
        work horse runs in a session of its own, so the process group alone would miss it)."""
        if self.proc is None:
            return
        self.kills += 1
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM, then after ``grace_s`` SIGKILL; and then SIGKILL to whatever it started that is
        still there (a worker's own Ray head runs in a session of its own: a worker killed while it
        stopped it would leave it, and its Ray workers, using the CPU for the rest of the run)."""
        if self.proc is None:
            return
        started = {pid: _start_time(pid) for pid in descendants(self.proc.pid)}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid, since in started.items():
            if since is not None and _start_time(pid) == since:  # the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def pids_running(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (e.g. Ray's ``RayTrainWorker`` actors)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()[:64]


class Api(Process):
    """``inco serve`` on a port of its own."""

    def __init__(self, env: dict[str, str], log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__(["serve", "--port", str(self.port)], env, log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        super().start()
        wait_until(lambda: httpx.get(self.url + "/healthz", timeout=2).status_code == 200, "inco serve", 60)


class Chaos:
    """A running service to inject faults into (see :func:`chaos_service`), with polling helpers."""

    def __init__(
        self, home: Path, redis: RedisServer, proxy: TcpProxy, db: str, env: dict[str, str], *, observer_db: str
    ) -> None:
        self.home, self.redis, self.proxy, self.db, self.env = home, redis, proxy, db, env
        self.api = Api(env, home / "api.log")
        self.worker = Process(["worker"], env, home / "worker.log")
        self.engine = make_engine(observer_db)  # the test's own view of the store: not through the proxy
        self.token = ""
        self.notes: list[str] = []  # what a test did when (see note), shown by report

    def note(self, what: str) -> None:
        """Record a step of the test with the time, for :meth:`report`."""
        self.notes.append(f"{time.strftime('%H:%M:%S')} {what}")

    @property
    def headers(self) -> dict[str, str]:
        return auth(self.token)

    def http(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return httpx.request(method, self.api.url + path, headers=headers, timeout=30, **kw)

    def submit(self, body: dict | None = None) -> str:
        r = self.http("POST", "/v1/jobs", json=body or SMOKE)
        if r.status_code != 201:
            raise AssertionError(f"submit answered {r.status_code}: {r.text}")
        return r.json()["id"]

    def job(self, job_id: str) -> dict:
        r = self.http("GET", f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, timeout_s: float = 300) -> dict:
        job = wait_until(lambda: (j := self.job(job_id))["status"] in FINISHED and j, f"job {job_id}", timeout_s, 0.5)
        return job

    def epochs(self, job_id: str) -> list[int]:
        return [m["epoch"] for m in self.http("GET", f"/v1/jobs/{job_id}/metrics").json() if m["stage"] == "pretrain"]

    def audit(self, job_id: str) -> dict[str, Any]:
        """How a finished job came out: status, error, attempts, metric rows stored more than once
        (same stage and epoch), result rows, pretraining epochs."""
        job = self.job(job_id)
        metrics = self.http("GET", f"/v1/jobs/{job_id}/metrics").json()
        keys = [(m["stage"], m["epoch"]) for m in metrics]
        return {
            "status": job["status"],
            "error": job["error"],
            "attempts": job["attempts"],
            "duplicated_metrics": len(keys) - len(set(keys)),
            "results": len(self.http("GET", f"/v1/jobs/{job_id}/results").json()),
            "pretrain_epochs": [e for s, e in keys if s == "pretrain"],
        }

    def check_intact(self, job_id: str, epochs: int | None = None, timeout_s: float = 300) -> dict:
        """Succeeded (within ``timeout_s``), no epoch of any stage stored twice (``epochs`` pretraining
        epochs when given; a job that reused a stored backbone has none), exactly one result row."""
        job = self.wait(job_id, timeout_s)
        assert job["status"] == "succeeded", f"{job['error']}\n{(self.home / 'worker.log').read_text()[-3000:]}"
        audit = self.audit(job_id)
        assert audit["duplicated_metrics"] == 0 and audit["results"] == 1, audit
        if epochs is not None:
            assert audit["pretrain_epochs"] == list(range(1, epochs + 1)), audit
        return job

    def queued_in_redis(self) -> list[str]:
        return Queue(self.env["INCO_QUEUE"], connection=Redis.from_url(self.redis.url)).job_ids

    def new_worker(self, name: str, *, own_ray: bool = False) -> Process:
        """Another ``inco worker`` (another machine): on the shared Ray head, or with ``own_ray`` on a
        local Ray head of its own that dies with it (as on a machine of its own)."""
        env = dict(self.env)
        if own_ray:
            for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
                env.pop(key, None)
        return Process(["worker"], env, self.home / f"{name}.log")

    def listening(self, runner: Process) -> bool:
        """Whether the ``inco worker`` process ``runner`` serves the queue (RQ registered it): started,
        its store and Redis reached, its Ray head up, torch loaded."""
        from rq import Worker

        queue = Queue(self.env["INCO_QUEUE"], connection=Redis.from_url(self.redis.url))
        return runner.alive and any(w.pid == runner.proc.pid for w in Worker.all(queue=queue))

    def report(self, job_id: str, lines: int = 60) -> str:
        """What a failed fault test shows: the job's state, its log messages and epochs, and the last
        ``lines`` lines of every log the service wrote (API, workers)."""
        parts = ["test steps:", *(f"  {n}" for n in self.notes)]
        try:
            job = self.job(job_id)
            parts.append(f"job: status={job['status']} attempts={job['attempts']} error={job['error']}")
            parts.append(f"epochs: {self.epochs(job_id)}")
            for m in self.http("GET", f"/v1/jobs/{job_id}/logs").json():
                parts.append(f"  {m['created_at']} {m['level']} {m['message']}")
        except Exception as exc:  # the report goes with the failure whatever state the service is in
            parts.append(f"(job not readable: {exc})")
        for log in sorted(self.home.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    @contextmanager
    def explained(self, job_id: str) -> Iterator[None]:
        """An assertion failing in the block carries :meth:`report` with it (CI shows only the failure)."""
        try:
            yield
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.report(job_id)}") from exc

    def horse_pid(self, job_id: str) -> int | None:
        """The work horse running the job: the holder of its lease (``host:pid``)."""
        owner = holder(Redis.from_url(self.redis.url), job_id)
        return int(owner.rsplit(":", 1)[1]) if owner else None


@contextmanager
def chaos_service(
    home: Path,
    neu_path: Path,
    ray_env: dict[str, str],
    *,
    db_password: str,
    env_overrides: dict[str, str] | None = None,
) -> Iterator[Chaos]:
    """The API and a worker as processes, a private AOF Redis, and a PostgreSQL database of its own
    reached through a :class:`TcpProxy` (with a password in its URL, to check it never leaks), team
    ``alpha`` with the NEU-CLS images as data set ``default``. Short heartbeats so faults show fast;
    ``env_overrides`` change the service's ``INCO_`` settings."""
    with scratch_database("inco_faults") as name:
        proxy = TcpProxy(*pg_host_port()).start()
        db = f"postgresql://postgres:{db_password}@127.0.0.1:{proxy.port}/{name}"
        redis = RedisServer(home / "redis")
        redis.start()
        env = {
            **os.environ,
            **ray_env,
            "INCO_HOME": str(home),
            "INCO_DATABASE_URL": db,
            "INCO_REDIS_URL": redis.url,
            "INCO_DATA_ROOT": str(neu_path.parent),
            "INCO_QUEUE": f"inco-chaos-{secrets.token_hex(3)}",
            "INCO_CPUS_PER_WORKER": "2",
            "INCO_HEARTBEAT_S": "2",
            "INCO_MAINTENANCE_S": "5",
            "INCO_LOG_FORMAT": "text",
            "INCO_TRAIN_RESTARTS": "0",
            "INCO_JOB_RETRIES": "3",  # a job survives the three deaths of the pick-up test
            # the CPU priority is test_priority's: here the service's processes get the CPU as the other
            # tests running beside these do, so a kill is timed, not how long a starved one waits
            "INCO_WORKER_NICE": "0",
            **(env_overrides or {}),
        }
        svc = Chaos(home, redis, proxy, db, env, observer_db=PG_ADMIN.rsplit("/", 1)[0] + f"/{name}")
        migrate(svc.engine)
        svc.token = make_team(svc.engine, "alpha")
        svc.api.start()
        r = svc.http("POST", "/v1/datasets", json={"name": "default", "path": neu_path.name})
        if r.status_code != 201:
            raise RuntimeError(f"registering the data set failed: {r.text}")
        try:
            yield svc
        finally:
            svc.worker.stop()
            svc.api.stop()
            redis.kill()
            proxy.close()
            svc.engine.dispose()
