"""``GET /metrics`` (latency histogram, queue depth, jobs by state, epoch throughput; still answering
when Redis and the database are down) and the JSON log lines of the API and the worker."""

from __future__ import annotations

import io
import json
import logging
import math
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue
from sqlalchemy import text

from inco_core.progress import EpochLog
from server import logs
from server.api.app import create_app
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from server.store.models import JobStatus
from tests.service_fixtures import auth, make_team, team_with_dataset
from worker.logs import job_logging, team_of

pytestmark = pytest.mark.integration
SMOKE = {"spec": {"ratios": ["1:16"], "preset": "smoke"}}
NAMES = (
    "inco_api_request_duration_seconds",
    "inco_queue_depth",
    "inco_jobs",
    "inco_epoch_images_per_second",
    "inco_dependency_up",
)


@pytest.fixture
def token(client: TestClient) -> str:
    return team_with_dataset(client)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """What the root logger writes as JSON lines while the test runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def scrape(client: TestClient) -> dict[str, list]:
    """Samples of /metrics by metric family name."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def sample(families: dict[str, list], name: str, **labels: str) -> float | None:
    family = name.removesuffix("_count").removesuffix("_bucket")
    for s in families.get(family, []):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_metrics_name_every_series_and_count_requests(client: TestClient, token: str) -> None:
    families = scrape(client)
    assert set(NAMES) <= set(families) and "inco_api_request_duration_seconds" in families
    before = sample(families, "inco_api_request_duration_seconds_count", method="GET", route="/v1/jobs", status="200")
    for _ in range(3):
        assert client.get("/v1/jobs", headers=auth(token)).status_code == 200
    client.get("/v1/jobs/nope", headers=auth(token))
    client.get("/v1/jobs")
    client.get("/no/such/path/123")
    families = scrape(client)
    count = "inco_api_request_duration_seconds_count"
    assert sample(families, count, method="GET", route="/v1/jobs", status="200") == (before or 0) + 3
    assert sample(families, count, method="GET", route="/v1/jobs/{job_id}", status="404") == 1
    assert sample(families, count, method="GET", route="/v1/jobs", status="401") == 1
    assert sample(families, count, method="GET", route="unmatched", status="404") == 1
    assert sample(families, count, method="POST", route="/v1/datasets", status="201") == 1
    routes = {s.labels["route"] for s in families["inco_api_request_duration_seconds"] if "route" in s.labels}
    assert not [r for r in routes if "nope" in r or "123" in r]  # templates only: bounded label values
    buckets = [s for s in families["inco_api_request_duration_seconds"] if s.name.endswith("_bucket")]
    assert any(s.labels["le"] == "+Inf" and s.value >= 3 for s in buckets)
    assert sample(families, "inco_dependency_up", dependency="redis") == 1
    assert sample(families, "inco_dependency_up", dependency="database") == 1


def test_each_app_has_its_own_registry(settings: Settings) -> None:
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        one.get("/healthz")
        one.get("/healthz")
        two.get("/healthz")
        count = "inco_api_request_duration_seconds_count"
        assert sample(scrape(one), count, route="/healthz") == 2
        assert sample(scrape(two), count, route="/healthz") == 1


def test_jobs_by_state_and_queue_depth_match_the_store(client: TestClient, token: str, settings: Settings) -> None:
    other = make_team(client.app.state.engine, "beta")
    client.post("/v1/datasets", json={"name": "default", "path": "neu-cls"}, headers=auth(other))
    ids = [client.post("/v1/jobs", json=SMOKE, headers=auth(t)).json()["id"] for t in (token, token, token, other)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(token))
    with session_scope(client.app.state.engine) as s:
        access.start_attempt(s, job_id=ids[1], worker="w1")
        access.start_attempt(s, job_id=ids[2], worker="w1")
    with session_scope(client.app.state.engine) as s:
        access.finish_job(s, job_id=ids[2], status=JobStatus.failed, error="boom")
    with client.app.state.engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all())
    assert stored == {"canceled": 1, "running": 1, "failed": 1, "queued": 1}
    families = scrape(client)
    for state in JobStatus:
        assert sample(families, "inco_jobs", state=state.value) == stored.get(state.value, 0), state
    depth = Queue(settings.queue, connection=client.app.state.redis).count
    assert depth == 3 and sample(families, "inco_queue_depth", queue=settings.queue) == depth


def test_epoch_throughput_is_the_latest_epoch_of_each_running_job(client: TestClient, token: str) -> None:
    running, done = (client.post("/v1/jobs", json=SMOKE, headers=auth(token)).json()["id"] for _ in range(2))
    with session_scope(client.app.state.engine) as s:
        for job_id in (running, done):
            access.start_attempt(s, job_id=job_id, worker="w1")
            access.add_metric(s, job_id=job_id, log=EpochLog("pretrain", 1, 3, {"loss": 2.0, "img_per_s": 100.0}))
    with session_scope(client.app.state.engine) as s:
        access.add_metric(s, job_id=running, log=EpochLog("pretrain", 2, 3, {"loss": 1.5, "img_per_s": 250.5}))
        access.finish_job(s, job_id=done, status=JobStatus.succeeded)
    samples = scrape(client)["inco_epoch_images_per_second"]
    assert [(s.labels, s.value) for s in samples] == [
        ({"job_id": running, "team": "alpha", "stage": "pretrain"}, 250.5)
    ]
    with session_scope(client.app.state.engine) as s:  # an epoch that reports no throughput: no sample
        access.add_metric(s, job_id=running, log=EpochLog("finetune 1:16", 1, 3, {"loss": 1.0}))
    assert scrape(client)["inco_epoch_images_per_second"] == []


def test_metrics_answer_when_redis_and_the_database_are_down(settings: Settings) -> None:
    down = settings.model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none"}
    )
    with TestClient(create_app(down, run_migrations=False)) as c:
        families = scrape(c)
        assert math.isnan(sample(families, "inco_queue_depth", queue=settings.queue))
        for state in JobStatus:
            assert math.isnan(sample(families, "inco_jobs", state=state.value))
        assert families["inco_epoch_images_per_second"] == []
        assert sample(families, "inco_dependency_up", dependency="redis") == 0
        assert sample(families, "inco_dependency_up", dependency="database") == 0
        assert c.get("/v1/jobs", headers=auth("inco_x")).status_code == 503
        count = "inco_api_request_duration_seconds_count"
        assert sample(scrape(c), count, method="GET", route="/v1/jobs", status="503") == 1


def test_a_request_that_raises_is_counted_and_logged_as_a_500(settings: Settings, captured: io.StringIO) -> None:
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("bug")

    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/boom").status_code == 500
        assert sample(scrape(c), "inco_api_request_duration_seconds_count", route="/boom", status="500") == 1
    line = next(json.loads(x) for x in captured.getvalue().splitlines() if '"route": "/boom"' in x)
    assert line["level"] == "error" and line["status"] == 500 and "RuntimeError: bug" in line["exc"]


def test_one_json_log_line_per_request_with_team_and_route(
    client: TestClient, token: str, captured: io.StringIO
) -> None:
    job = client.post("/v1/jobs", json=SMOKE, headers=auth(token)).json()
    client.get(f"/v1/jobs/{job['id']}", headers=auth(token))
    client.get("/v1/jobs")
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    requests = [x for x in lines if x["logger"] == "inco.api" and "route" in x]
    assert [(x["method"], x["route"], x["status"]) for x in requests] == [
        ("POST", "/v1/jobs", 201),
        ("GET", "/v1/jobs/{job_id}", 200),
        ("GET", "/v1/jobs", 401),
    ]
    first = requests[1]
    assert first["team"] == "alpha" and first["level"] == "info" and first["msg"] == "GET /v1/jobs/{job_id} 200"
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] > 0
    assert first["ts"].endswith("+00:00") and "T" in first["ts"]
    assert first["job_id"] == job["id"] and "job_id" not in requests[0]
    assert "team" not in requests[2]  # no valid token: no team
    assert token not in captured.getvalue()


def test_setup_logging_writes_json_or_text_with_the_bound_context() -> None:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    uvicorn_access = logging.getLogger("uvicorn.access").disabled
    try:
        buf = io.StringIO()
        logs.setup_logging("json", stream=buf)
        logs.setup_logging("json", stream=buf)  # a second call replaces the first handler
        assert len([h for h in root.handlers if getattr(h, "_inco", False)]) == 1
        with logs.bound(job_id="j1", team="alpha"):
            logging.getLogger("inco.worker").info("epoch %d", 3)
        logging.getLogger("inco.worker").warning("after")
        first, second = (json.loads(line) for line in buf.getvalue().splitlines())
        assert {k: first[k] for k in ("level", "logger", "msg", "job_id", "team")} == {
            "level": "info",
            "logger": "inco.worker",
            "msg": "epoch 3",
            "job_id": "j1",
            "team": "alpha",
        }
        assert second["msg"] == "after" and "job_id" not in second
        buf = io.StringIO()
        logs.setup_logging("text", stream=buf)
        with logs.bound(job_id="j2"):
            logging.getLogger("inco.worker").info("hello")
        assert buf.getvalue().rstrip().endswith("INFO inco.worker hello job_id=j2")
        with pytest.raises(ValueError, match="INCO_LOG_FORMAT"):
            logs.setup_logging("yaml")
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        logging.getLogger("uvicorn.access").disabled = uvicorn_access


def test_worker_lines_carry_job_id_and_team_from_every_thread(
    client: TestClient, token: str, captured: io.StringIO
) -> None:
    job_id = client.post("/v1/jobs", json=SMOKE, headers=auth(token)).json()["id"]
    engine = client.app.state.engine
    log = logging.getLogger("inco.worker")
    with job_logging(engine, job_id):
        log.info("in the job")
        thread = threading.Thread(target=lambda: log.info("in a thread Ray Train started"))
        thread.start()
        thread.join()
    log.info("between jobs")
    lines = {x["msg"]: x for x in map(json.loads, captured.getvalue().splitlines()) if x["logger"] == "inco.worker"}
    for msg in ("in the job", "in a thread Ray Train started"):
        assert lines[msg]["job_id"] == job_id and lines[msg]["team"] == "alpha", lines[msg]
    edges = [x for m, x in lines.items() if m.startswith(f"job {job_id}: work")]
    assert len(edges) == 2 and all(x["job_id"] == job_id and x["team"] == "alpha" for x in edges)
    with pytest.raises(RuntimeError), job_logging(engine, job_id):
        raise RuntimeError("training crashed")
    assert "work stopped after" in captured.getvalue() and "RuntimeError" in captured.getvalue()
    assert "job_id" not in lines["between jobs"] and "team" not in lines["between jobs"]
    assert team_of(engine, "no-such-job") is None
