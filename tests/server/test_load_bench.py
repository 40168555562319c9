"""bench/load.py's load driver against the API in-process (SQLite, real Redis, the NEU-CLS images):
the report's shape in both modes (closed loop, open loop), that failed requests are counted as errors
and arrivals the client could not send as dropped, and the markdown report of both runs."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlmodel import Session, func, select

from bench.load import KINDS, TreeCpu, drive, parse_args, parse_mix, targets, write_report
from cli.stack import KEEP_ALIVE_S, descendants
from server.api.app import create_app
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from server.store.models import Job, JobCreate
from tests.chaos import Api
from tests.server.test_store import _result_dict
from tests.service_fixtures import REDIS_TEST, auth, make_team

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the store the benchmark uses
STATS = {"count", "rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "errors", "limited_429", "status"}


def _run(settings: Settings, engine: Any, team: str = "load", **kwargs: Any) -> dict[str, Any]:
    """Register NEU-CLS for a new team, then run :func:`drive` over an in-process transport."""
    app = create_app(settings, run_migrations=False)  # the `engine` fixture migrated the store already
    headers = auth(make_team(engine, team))

    async def go() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=app)  # it runs no lifespan: the test does
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client,
        ):
            r = await client.post("/v1/datasets", json={"name": "default", "path": "neu-cls"})
            assert r.status_code == 201, r.text
            return await drive(client, **kwargs)

    return asyncio.run(go())


@pytest.mark.integration
@SQLITE
def test_mixed_load_report(settings: Settings, engine: Any) -> None:
    report = _run(
        settings,
        engine,
        mix=parse_mix("submit=20,job=30,jobs=20,results=30"),
        duration_s=3,
        concurrency=4,
        max_requests=60,
    )
    assert set(report) == {"mode", "concurrency", "seconds", "kinds", "reads", "total", "failures", "jobs_submitted"}
    assert report["mode"] == "closed" and report["concurrency"] == 4
    kinds = report["kinds"]
    assert set(kinds) <= set(KINDS) and {"submit", "results"} <= set(kinds)
    for stats in [*kinds.values(), report["reads"], report["total"]]:
        assert set(stats) == STATS
        assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    total = report["total"]
    assert 0 < total["count"] <= 60 and total["count"] == sum(s["count"] for s in kinds.values())
    assert report["reads"]["count"] == sum(kinds[k]["count"] for k in ("job", "jobs", "results") if k in kinds)
    assert total["rps"] == pytest.approx(total["count"] / report["seconds"])
    assert total["errors"] == 0 and report["failures"] == [], report["failures"]
    # every submit created one stored job, and the driver polled those jobs
    submitted = kinds["submit"]["count"]
    assert kinds["submit"]["status"] == {"201": submitted} and report["jobs_submitted"] == submitted
    with Session(engine) as s:
        assert s.exec(select(func.count()).select_from(Job)).one() == submitted
    if "job" in kinds:
        assert kinds["job"]["status"] == {"200": kinds["job"]["count"]}


@pytest.mark.integration
@SQLITE
def test_failed_requests_count_as_errors(settings: Settings, engine: Any) -> None:
    report = _run(
        settings,
        engine,
        mix={"job": 1, "results": 1},
        duration_s=3,
        concurrency=2,
        max_requests=30,
        job_ids=["no-such-job"],
    )
    job, results = report["kinds"]["job"], report["kinds"]["results"]
    assert job["count"] > 0 and job["status"] == {"404": job["count"]}
    assert job["errors"] == job["count"] and job["limited_429"] == 0
    assert results["errors"] == 0 and results["status"] == {"200": results["count"]}
    assert report["total"]["errors"] == report["reads"]["errors"] == job["count"]
    assert report["failures"] and all(f["status"] == 404 and "no job" in f["body"] for f in report["failures"])
    assert report["jobs_submitted"] == 0


@pytest.mark.integration
@SQLITE
def test_a_team_limit_is_counted_apart_from_errors(settings: Settings, engine: Any) -> None:
    """Submits over the team's limit of active jobs (429) are counted as ``limited_429``, not errors."""
    limited = settings.model_copy(update={"max_active_jobs": 2})
    report = _run(limited, engine, mix={"submit": 1}, duration_s=3, concurrency=1, max_requests=5)
    submit = report["kinds"]["submit"]
    assert submit["count"] == 5 and submit["status"] == {"201": 2, "429": 3}
    assert submit["limited_429"] == 3 and submit["errors"] == 0 and report["total"]["errors"] == 0
    assert report["failures"] == [] and report["jobs_submitted"] == 2


OPEN_KEYS = {"mode", "offered", "seconds", "kinds", "reads", "total", "failures", "jobs_submitted"}
OFFERED_KEYS = {
    "rate",
    "max_in_flight",
    "arrivals",
    "offered_rps",
    "sent",
    "dropped_by_client",
    "dropped_by_kind",
    "peak_in_flight",
    "send_lag_p99_ms",
    "send_lag_max_ms",
}


@pytest.mark.integration
@SQLITE
def test_open_loop_report(settings: Settings, engine: Any) -> None:
    """A few seconds at a low rate: every arrival is sent (none dropped), the answers are counted per
    kind, and the latency (from the scheduled arrival) is at least the time the send was late."""
    report = _run(settings, engine, mix=parse_mix("submit=20,job=30,jobs=20,results=30"), duration_s=3, rate=15)
    assert set(report) == OPEN_KEYS and report["mode"] == "open"
    offered = report["offered"]
    assert set(offered) == OFFERED_KEYS and offered["rate"] == 15 and offered["max_in_flight"] == 64
    # Poisson arrivals at 15/s for 3 s: 45 expected; the seeded schedule gives a count near it
    assert 20 <= offered["arrivals"] <= 75 and offered["offered_rps"] == pytest.approx(offered["arrivals"] / 3)
    assert offered["dropped_by_client"] == 0 and offered["dropped_by_kind"] == {}
    assert offered["sent"] == offered["arrivals"] == report["total"]["count"]
    assert 1 <= offered["peak_in_flight"] <= 64
    assert 0 <= offered["send_lag_p99_ms"] <= offered["send_lag_max_ms"] <= report["total"]["max_ms"]
    kinds, total = report["kinds"], report["total"]
    for stats in [*kinds.values(), report["reads"], total]:
        assert set(stats) == STATS
        if stats["count"]:
            assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert total["count"] == sum(s["count"] for s in kinds.values())
    assert total["errors"] == 0 and report["failures"] == [], report["failures"]
    assert kinds["submit"]["status"] == {"201": kinds["submit"]["count"]}
    assert report["jobs_submitted"] == kinds["submit"]["count"]
    assert targets(report)["zero_errors"] and targets(report)["none_dropped"]
    # the same seed gives the same schedule and the same draws (a `job` draw made before the first
    # submit was answered is sent as `jobs`, so those two are compared together)
    again = _run(settings, engine, "again", mix=parse_mix("submit=20,job=30,jobs=20,results=30"), duration_s=3, rate=15)

    def draws(r: dict[str, Any]) -> tuple[int, ...]:
        n = {k: s["count"] for k, s in r["kinds"].items()}
        return r["offered"]["arrivals"], n.get("submit", 0), n.get("job", 0) + n.get("jobs", 0), n.get("results", 0)

    assert draws(again) == draws(report)


@pytest.mark.integration
@SQLITE
def test_open_loop_counts_arrivals_it_could_not_send(settings: Settings, engine: Any) -> None:
    """With one request allowed in flight and arrivals faster than the API answers, the arrivals that
    find it busy are counted as dropped by the client (by kind), never sent and never lost."""
    report = _run(
        settings, engine, mix={"submit": 1, "results": 1}, duration_s=2, rate=400, max_in_flight=1, max_requests=300
    )
    offered = report["offered"]
    assert offered["max_in_flight"] == offered["peak_in_flight"] == 1
    assert offered["dropped_by_client"] > 0
    assert offered["dropped_by_client"] == sum(offered["dropped_by_kind"].values())
    assert set(offered["dropped_by_kind"]) <= {"submit", "results"}
    assert offered["sent"] + offered["dropped_by_client"] == offered["arrivals"] <= 300
    assert offered["sent"] == report["total"]["count"] > 0 and report["total"]["errors"] == 0
    # the team's limit of active jobs (20 by default) may answer later submits 429, counted apart
    assert report["jobs_submitted"] == report["kinds"].get("submit", {}).get("status", {}).get("201", 0)
    verdict = targets(report)
    assert verdict["zero_errors"] and not verdict["none_dropped"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0}, "rate must be above 0"),
        ({"rate": float("inf")}, "rate must be above 0"),
        ({"rate": 10, "max_in_flight": 0}, "max_in_flight 1 or more"),
        ({"concurrency": 0}, "concurrency must be 1 or more"),
    ],
)
def test_bad_drive_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    async def go() -> None:
        async with httpx.AsyncClient(base_url="http://test") as client:
            await drive(client, mix={"results": 1}, duration_s=1, **kwargs)

    with pytest.raises(ValueError, match=message):
        asyncio.run(go())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate", "0"], "--rate must be above 0"),
        (["--rate", "nan"], "--rate must be above 0"),
        (["--max-in-flight", "0"], "--max-in-flight must be 1 or more"),
        (["--duration-s", "0"], "--duration-s must be above 0"),
        (["--requests", "0"], "--requests 1 or more"),
        (["--mode", "half"], "invalid choice"),
        (["--mix", "poll=1"], "KIND one of"),
        (["--worker-nice", "20"], "--worker-nice must be 0 to 19"),
        (["--worker-nice", "-1"], "--worker-nice must be 0 to 19"),
    ],
)
def test_bad_command_lines_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_default_command_line_runs_both_modes() -> None:
    args = parse_args([])
    assert (args.mode, args.rate, args.max_in_flight, args.concurrency, args.duration_s) == ("both", 40, 64, 8, None)
    assert args.worker_nice == Settings().worker_nice == 10  # the benchmark runs the service's default


def test_cpu_of_processes_that_end_during_a_run_is_counted() -> None:
    """A process of a tree that burns CPU and exits between two samples still counts (Ray reaps its
    workers without adding their time to its own, so reading the trees' times at both ends missed
    them); a process of the ``alone`` part counts without its children."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    script = f"import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', {burn!r}])\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        with TreeCpu({"jobs": [parent.pid], "load": [os.getpid()]}, alone="load", every_s=0.05) as sampler:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not descendants(parent.pid):
                time.sleep(0.02)  # the burner started
            while time.monotonic() < deadline and descendants(parent.pid):
                time.sleep(0.05)  # ... and ended
        used = sampler.used()
    finally:
        parent.kill()
        parent.wait()
    assert 0.45 <= used["jobs"] < 5, used  # the burner's 0.6 s (less what it used after the last sample)
    assert used["load"] < 0.45, used  # this test process only, not the burner it does not own


@pytest.mark.integration
@SQLITE
def test_report_shows_both_runs(settings: Settings, engine: Any, tmp_path: Any) -> None:
    """The markdown report of a closed-loop and an open-loop run made in-process: both sections, the
    open-loop one (the targets) first, with its dropped arrivals and the targets judged on it."""
    mix = parse_mix("job=40,jobs=20,results=40")
    runs = {
        "closed": _run(settings, engine, mix=mix, duration_s=1, concurrency=2, max_requests=20),
        "open": _run(settings, engine, "other", mix=mix, duration_s=1, rate=400, max_in_flight=1, max_requests=100),
    }
    cpu = {
        "load_avg_before": [1.0, 1.0, 1.0],
        "load_avg_after": [1.5, 1.0, 1.0],
        "busy_cpu_s": 1.0,
        "api_cpu_s": 0.5,
        "api_cpu_ms_per_request": 5.0,
        "jobs_cpu_s": 0.0,
        "load_generator_cpu_s": 0.2,
        "other_cpu_s": 0.3,
        "cores": 2,
    }
    for run in runs.values():
        run.update(targets=targets(run), cpu=cpu, duration_s=1, max_requests=None)
    summary = {
        "date": "today",
        "machine": "here",
        "commit": "abc",
        "command": "bench/load.py",
        "mix": mix,
        "workers": 0,
        "spec": {"preset": "smoke"},
        "runs": runs,
        "jobs_by_status_after": {"queued": 0},
        "dataset": {"name": "default", "images": 1800, "path": "neu-cls"},
    }
    write_report(summary, tmp_path / "load")
    md = (tmp_path / "load.md").read_text()
    assert md.index("## Open loop") < md.index("## Closed loop")
    dropped = runs["open"]["offered"]["dropped_by_client"]
    assert dropped > 0 and f"**{dropped} dropped by the client**" in md
    assert "no arrival dropped: **missed**" in md
    assert f"Saturation throughput: **{runs['closed']['total']['rps']:.1f} requests/s**" in md
    assert md.count("| `GET /v1/results` |") == 2 and "| closed loop | open loop |" not in md
    assert "| | open loop | closed loop |" in md
    assert json.loads((tmp_path / "load.json").read_text())["runs"]["open"]["offered"]["arrivals"] > 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("submit=10,poll=5", "KIND one of submit, job, jobs, results"),
        ("submit", "must look like KIND=WEIGHT"),
        ("submit=x", "must be a number"),
        ("submit=-1", "0 or more"),
        ("submit=0,jobs=0", "at least one kind"),
    ],
)
def test_bad_mix_is_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_mix(text)


def test_mix_weights() -> None:
    assert parse_mix(" submit=10, job=40 ,jobs=20,results=30") == {"submit": 10, "job": 40, "jobs": 20, "results": 30}


# -- the read path the benchmark profiled -------------------------------------------------------
@pytest.mark.integration
@SQLITE
def test_job_reads_are_one_query_each(settings: Settings, engine: Any) -> None:
    """``GET /v1/jobs/{id}``, ``GET /v1/jobs`` and ``GET /v1/results`` each read the store with one
    query besides the token check (plain rows, no ORM objects: they were most of a request's CPU),
    and show the same jobs, result counts and leaderboard as the ORM rows do."""
    token = make_team(engine, "alpha")
    make_team(engine, "beta")
    with session_scope(engine) as s:
        team = access.ensure_team(s, name="alpha")
        other = access.ensure_team(s, name="beta")
        request = JobCreate.model_validate({"spec": {"ratios": ["1:16"], "preset": "smoke"}})
        ids = [access.create_job(s, team_id=team.id, request=request, spec={"n": i}).id for i in range(3)]
        access.create_job(s, team_id=other.id, request=request, spec={"n": 9})  # never shown to alpha
        job = access.get_job(s, job_id=ids[1], team_id=None)
        access.add_results(s, job=job, result=_result_dict([0.5, 0.7]), dataset="d")
    statements: list[str] = []

    def listen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    with TestClient(create_app(settings)) as client:
        event.listen(client.app.state.engine, "before_cursor_execute", listen)
        one = client.get(f"/v1/jobs/{ids[1]}", headers=auth(token))
        reads = len(statements)
        page = client.get("/v1/jobs", headers=auth(token))
        board = client.get("/v1/results", headers=auth(token))
        assert one.status_code == page.status_code == board.status_code == 200
        # token + job, token + page, token + results (a session's BEGIN/COMMIT are not statements here)
        assert reads == 2 and len(statements) == 6, statements
        assert client.get(f"/v1/jobs/{'0' * 32}", headers=auth(token)).status_code == 404
    assert one.json()["team"] == "alpha" and one.json()["results"] == 2 and one.json()["spec"] == {"n": 1}
    assert [(j["id"], j["results"], j["team"]) for j in page.json()] == [
        (ids[2], 0, "alpha"),
        (ids[1], 2, "alpha"),
        (ids[0], 0, "alpha"),
    ]
    with Session(engine) as s:
        orm = access.leaderboard(access.list_results(s, team_id=team.id))
    assert board.json() == [row.model_dump(mode="json") for row in orm] and board.json()[0]["count"] == 2


@pytest.mark.integration
@SQLITE
def test_a_serving_app_freezes_the_heap_it_starts_with(settings: Settings) -> None:
    """``inco serve`` (``freeze_heap``) imports what the routes load on first use (torch, through the
    data set scanner) and freezes the heap when it starts, so full collections stop walking ~300,000
    long-lived objects (a ~400 ms pause of every request in flight); an app made without it (tests)
    freezes nothing."""
    gc.unfreeze()
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/healthz").status_code == 200 and gc.get_freeze_count() == 0
        with TestClient(create_app(settings, freeze_heap=True)) as client:
            assert client.get("/healthz").status_code == 200
            assert "inco_core.data" in sys.modules and "torch" in sys.modules
            assert gc.get_freeze_count() > 100_000
    finally:
        gc.unfreeze()


def _answer(sock: socket.socket) -> bytes:
    """One answer to ``GET /healthz`` (b"" when the server closed the connection)."""
    data = b""
    while b'{"status":"ok"}' not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.integration
def test_inco_serve_keeps_idle_connections_longer_than_clients_do(tmp_path: Path) -> None:
    """``inco serve`` keeps an idle keep-alive connection open past the 5 s that httpx keeps its own
    (and that uvicorn kept by default): with equal timeouts the server closed connections just as the
    benchmark's client reused them, failing a request now and then."""
    env = {**os.environ, "INCO_HOME": str(tmp_path), "INCO_REDIS_URL": REDIS_TEST}
    api = Api(env, tmp_path / "api.log")
    api.start()
    try:
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
            request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            sock.sendall(request)
            assert _answer(sock).startswith(b"HTTP/1.1 200")
            time.sleep(6.5)  # idle past 5 s (httpx, and uvicorn by default), well inside KEEP_ALIVE_S
            sock.sendall(request)
            assert _answer(sock).startswith(b"HTTP/1.1 200")
    finally:
        api.stop()
    assert httpx.Limits().keepalive_expiry < KEEP_ALIVE_S  # type: ignore[operator]
