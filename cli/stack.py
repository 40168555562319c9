"""Running the service: ``inco serve``, ``inco worker``, ``inco admin``, and the local stack
(``inco up`` / ``inco down``: Redis, the API, one worker and a local Ray, all under ``INCO_HOME``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import typer

from cli.common import App, fail
from server.settings import Settings

admin_app = App(help="Administration on the store directly (teams, tokens, data sets).", no_args_is_help=True)
token_app = App(help="API tokens.", no_args_is_help=True)
admin_app.add_typer(token_app, name="token")
team_app = App(help="Teams' settings.", no_args_is_help=True)
admin_app.add_typer(team_app, name="team")
LOCAL_TEAM = "local"
STOP_GRACE_S = {"worker": 30, "api": 10, "ray": 5, "redis": 10}  # then SIGKILL (a local Ray takes ~35 s to exit)


def _engine(settings: Settings) -> Any:
    from server.store.db import make_engine, migrate

    engine = make_engine(settings.db_url)
    migrate(engine)
    return engine


# -- serve, worker, admin -----------------------------------------------------------------------
KEEP_ALIVE_S = 75
"""How long the API keeps an idle connection open. Longer than clients keep theirs (httpx: 5 s, the
same as uvicorn's default): with equal timeouts the server closed connections just as clients reused
them, and a request failed with a closed connection now and then (bench/load.py)."""


def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
) -> None:
    """Run the HTTP API (it migrates the store when it starts, retrying while the database is down)."""
    import uvicorn

    from server.api.app import create_app
    from server.logs import setup_logging

    settings = Settings()
    setup_logging(settings.log_format)  # JSON lines (INCO_LOG_FORMAT); the API logs each request itself
    # migrates at start (while the database is down it retries and answers 503); freezes the heap it starts with
    app = create_app(settings, freeze_heap=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        log_config=None,
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
    )


def worker(
    burst: Annotated[bool, typer.Option(help="stop when the queue is empty")] = False,
    name: Annotated[str | None, typer.Option(help="worker name (default host and pid)")] = None,
) -> None:
    """Take jobs from the queue and run them on Ray (RAY_ADDRESS, or a local Ray it starts)."""
    from server.logs import setup_logging
    from worker.main import run_worker

    settings = Settings()
    setup_logging(settings.log_format)  # JSON lines with job_id and team while a job runs (worker/logs.py)
    _run_service(lambda: run_worker(settings, burst=burst, name=name))


def _run_service(fn: Any) -> Any:
    from inco_core.errors import InCoError

    try:
        return fn()
    except InCoError as exc:
        fail(str(exc))


@token_app.command("create")
def token_create(
    team: Annotated[str, typer.Option(help="team name (created when new)")],
    name: Annotated[str, typer.Option(help="a note, e.g. who uses the token")] = "",
    scope: Annotated[
        list[str] | None,
        typer.Option(help="what the token may do: read, submit, admin, predict; repeat it (default: read and submit)"),
    ] = None,
) -> None:
    """Create an API token for a team; it is printed once and only its hash is stored."""
    from server.store import access
    from server.store.db import session_scope

    if not team.strip() or len(team) > 64:
        fail("--team needs a name of 1 to 64 characters")
    scopes = _run_service(lambda: access.check_scopes(scope or None))

    def go() -> str:
        with session_scope(_engine(Settings())) as s:
            return access.create_token(s, team=access.ensure_team(s, name=team.strip()), name=name, scopes=scopes)

    typer.echo(_run_service(go))


@team_app.command("set")
def team_set(
    team: Annotated[str, typer.Option(help="team name")],
    review_level: Annotated[
        float, typer.Option(min=0.5, max=0.999, help="coverage of the team's prediction sets (predict's default)")
    ],
) -> None:
    """Set a team's review level: predict's conformal sets hold the true class this often, and an image
    whose set holds several classes is sent to a person."""
    from server.store import access
    from server.store.db import session_scope

    def go() -> None:
        with session_scope(_engine(Settings())) as s:
            found = access.find_team(s, name=team.strip())
            if found is None:
                fail(f"no team named {team!r}: create it with `inco admin token create --team {team}`")
            found.review_level = review_level
            s.add(found)

    _run_service(go)
    typer.echo(
        f"team {team}: prediction sets at {review_level:.1%} coverage; an image whose set holds several "
        "classes is sent to review"
    )


@token_app.command("list")
def token_list(team: Annotated[str, typer.Option(help="team name")]) -> None:
    """List a team's tokens (prefix, scopes, created, revoked, name); never the tokens themselves."""
    from server.store import access
    from server.store.db import session_scope

    def go() -> list[tuple[str, str, str, str, str]] | None:
        with session_scope(_engine(Settings())) as s:
            found = access.find_team(s, name=team.strip())
            if found is None:
                return None
            return [
                (
                    t.prefix,
                    ",".join(t.scopes),
                    f"{t.created_at:%Y-%m-%dT%H:%M:%S}",
                    f"{t.revoked_at:%Y-%m-%dT%H:%M:%S}" if t.revoked_at else "active",
                    t.name,
                )
                for t in access.list_tokens(s, team_id=found.id)
            ]

    rows = _run_service(go)
    if rows is None:
        fail(f"no team named {team.strip()!r}: `inco admin token create --team NAME` makes one")
    typer.echo(f"{'prefix':<13} {'scopes':<18} {'created':<20} {'revoked':<20} name")
    for prefix, scopes, created, revoked, note in rows:
        typer.echo(f"{prefix:<13} {scopes:<18} {created:<20} {revoked:<20} {note}".rstrip())


@token_app.command("revoke")
def token_revoke(prefix: Annotated[str, typer.Argument(help="the first 12 characters of the token")]) -> None:
    """Revoke a token by its first 12 characters."""
    from server.store import access
    from server.store.db import session_scope

    def go() -> int:
        with session_scope(_engine(Settings())) as s:
            return access.revoke_token(s, prefix=prefix[:12])

    if not _run_service(go):
        fail(f"no active token starts with {prefix[:12]!r}")
    typer.echo(f"revoked {prefix[:12]}")


# -- the local stack ----------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie may linger where PID 1 reaps none)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def process_table() -> dict[int, list[str]]:
    """Every process's ``/proc/PID/stat`` fields after its command name (``[1]``: its parent,
    ``[11]``/``[12]``: its user/system CPU ticks), by pid."""
    table: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            table[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
    return table


def descendants(pid: int, table: dict[int, list[str]] | None = None) -> list[int]:
    """Child processes of ``pid``, recursively (from /proc, or ``table`` from :func:`process_table`;
    an RQ work horse has a process group of its own, so signalling the worker's group does not reach it)."""
    children: dict[int, list[int]] = {}
    for child, fields in (process_table() if table is None else table).items():
        children.setdefault(int(fields[1]), []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _spawn(name: str, cmd: list[str], env: dict[str, str], home: Path) -> int:
    (home / "logs").mkdir(parents=True, exist_ok=True)
    with open(home / "logs" / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def _wait_for(check: Any, what: str, timeout_s: float, pid: int | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if pid is not None and not _alive(pid):
            break
        time.sleep(0.3)
    hint = f"; see {log}" if log else ""
    raise RuntimeError(f"{what} did not start within {timeout_s:.0f} s{hint}")


def _redis_ok(url: str) -> bool:
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except RedisError:
        return False


def _start_redis(settings: Settings, env: dict[str, str]) -> int | None:
    """Use a reachable Redis; else start ``redis-server`` (append-only file under INCO_HOME)."""
    if _redis_ok(settings.redis_url):
        return None
    url = urlparse(settings.redis_url)
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise RuntimeError(f"Redis at {settings.redis_url} does not answer; start it or fix INCO_REDIS_URL")
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            f"no Redis answers at {settings.redis_url} and redis-server is not installed: "
            "install it (apt install redis-server, brew install redis) or set INCO_REDIS_URL"
        )
    folder = settings.home / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(url.port or 6379),
        "--dir",
        str(folder),
        "--appendonly",
        "yes",
        "--save",
        "",
    ]
    pid = _spawn("redis", cmd, env, settings.home)
    _wait_for(lambda: _redis_ok(settings.redis_url), "redis-server", 20, pid, settings.home / "logs" / "redis.log")
    return pid


def _local_token(settings: Settings, engine: Any) -> str:
    """The local stack's token (every scope), kept in ``INCO_HOME/token``; a new one when
    the kept one is revoked or lacks a scope."""
    from server.store import access
    from server.store.db import session_scope
    from server.store.models import Scope

    path = settings.home / "token"
    every = [scope.value for scope in Scope]
    with session_scope(engine) as s:
        if path.exists():
            token = path.read_text().strip()
            found = access.authenticate(s, token=token)
            if found is not None and set(found[1].scopes) >= set(every):
                return token
            if found is not None:  # from before scopes: replaced by one with all of them
                access.revoke_token(s, prefix=found[1].prefix, team_id=found[0].id)
        token = access.create_token(s, team=access.ensure_team(s, name=LOCAL_TEAM), name="local stack", scopes=every)
    path.write_text(token)
    path.chmod(0o600)
    return token


def _register_default_data(engine: Any, data: Path) -> str:
    from inco_core.files import scan
    from server.store import access
    from server.store.db import session_scope

    items = scan(data)
    with session_scope(engine) as s:
        team = access.ensure_team(s, name=LOCAL_TEAM)
        access.add_dataset(
            s,
            team_id=team.id,
            name="default",
            path=str(data.resolve()),
            images=len(items),
            classes=sorted({c for _, c in items}),
            replace=True,
        )
    return f"data set 'default' -> {data.resolve()} ({len(items)} images)"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def up(
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    data: Annotated[
        Path | None, typer.Option(help="image folder registered as data set 'default' ($INCO_DATA)")
    ] = None,
) -> None:
    """Start Redis (if none answers), the API, one worker and a local Ray; `inco down` stops them."""
    import httpx

    from inco_core.errors import InCoError
    from worker.main import ray_env, start_local_ray

    settings = Settings()
    state_file = settings.stack_file
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if any(_alive(pid) for pid in state.get("pids", {}).values()):
            typer.echo(f"the local stack is running already (API {state['api_url']}); `inco down` stops it")
            return
    if not _port_free(port):
        fail(f"port {port} is in use: pick another with --port")
    settings.home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INCO_HOME": str(settings.home)}
    env.setdefault("INCO_CPUS_PER_WORKER", str(os.cpu_count() or 1))
    pids: dict[str, int] = {}
    notes: list[str] = []
    try:
        redis_pid = _start_redis(settings, env)
        if redis_pid:
            pids["redis"] = redis_pid
            notes.append(f"started redis-server (data in {settings.home / 'redis'})")
        engine = _engine(settings)
        token = _local_token(settings, engine)
        data = data or settings.data
        if data is not None:
            notes.append(_register_default_data(engine, data))
        engine.dispose()
        ray_proc, ray_address = start_local_ray(
            settings.home, nice=settings.worker_nice, dashboard=settings.ray_dashboard
        )
        pids["ray"] = ray_proc.pid
        env.update(ray_env(settings.home))
        env["RAY_ADDRESS"] = ray_address
        py = sys.executable
        pids["api"] = _spawn(
            "api",
            [
                *(py, "-m", "uvicorn", "--factory", "server.api.app:app"),
                *("--host", "127.0.0.1", "--port", str(port), "--timeout-keep-alive", str(KEEP_ALIVE_S)),
            ],
            env,
            settings.home,
        )
        pids["worker"] = _spawn("worker", [py, "-m", "cli.main", "worker"], env, settings.home)

        def api_up() -> bool:
            try:
                return httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(api_up, "the API", 60, pids["api"], settings.home / "logs" / "api.log")
    except (InCoError, RuntimeError, OSError) as exc:
        _stop(pids)
        fail(str(exc))
    state = {"api_url": api_url, "token": token, "pids": pids, "ray_address": ray_address, "home": str(settings.home)}
    state_file.write_text(json.dumps(state, indent=2))
    state_file.chmod(0o600)
    for note in notes:
        typer.echo(note, err=True)
    typer.echo(f"InCo is up: API {api_url}, worker on Ray {ray_address}, logs in {settings.home / 'logs'}", err=True)
    typer.echo(f"the web page: {api_url}/ (sign in with the token in {settings.home / 'token'})", err=True)
    typer.echo("submit a job with `inco submit --ratio 1:16`; stop everything with `inco down`", err=True)


def _stop(pids: dict[str, int]) -> list[str]:
    stopped = []
    for name in ("worker", "api", "ray", "redis"):
        pid = pids.get(name)
        if pid is None or not _alive(pid):
            continue
        family = descendants(pid)
        try:
            os.killpg(pid, signal.SIGTERM)
            if name == "worker":  # RQ: a second SIGTERM stops the running job too (it is re-run later)
                time.sleep(1)
                os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + STOP_GRACE_S[name]
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.2)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        for child in family:  # e.g. a work horse that outlived its worker
            if _alive(child):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        _wait_gone([pid, *family])
        stopped.append(name)
    return stopped


def _wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    """Wait until SIGKILLed processes are gone: the signal is delivered at once, but a process may take
    a moment to exit (a Ray head unmapping its object store), and `inco down` returns only when it has."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in pids:
            _reap(pid)
        if not any(_alive(pid) for pid in pids):
            return
        time.sleep(0.05)
    left = [pid for pid in pids if _alive(pid)]
    if left:
        typer.echo(f"warning: processes {left} did not exit {timeout_s:.0f} s after SIGKILL", err=True)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def down() -> None:
    """Stop what `inco up` started (a Redis it did not start is left running)."""
    settings = Settings()
    if not settings.stack_file.exists():
        typer.echo("no local stack is running (nothing to stop)", err=True)
        return
    state = json.loads(settings.stack_file.read_text())
    stopped = _stop(state.get("pids", {}))
    settings.stack_file.unlink(missing_ok=True)
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}", err=True)


def register(app: App) -> None:
    app.command()(serve)
    app.command()(worker)
    app.command()(up)
    app.command()(down)
    app.add_typer(admin_app, name="admin")
