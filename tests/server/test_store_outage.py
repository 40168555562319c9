"""The API and an unreachable database (PostgreSQL behind a TCP proxy that is cut): it starts anyway,
answers 503 with the reason and says so on /readyz (no crash loop), and serves by itself once the
database answers again."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.settings import Settings
from server.store.db import make_engine
from tests.chaos import TcpProxy, wait_until
from tests.service_fixtures import auth, make_team, pg_host_port, scratch_database

# connections the cut left broken are garbage-collected by psycopg with a warning: expected here
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


@pytest.fixture(autouse=True)
def _collect_broken_connections() -> Iterator[None]:
    """Collect them before this test ends, under its warning filter, not in whichever test runs next."""
    yield
    gc.collect()


@pytest.fixture
def pg_behind_proxy() -> Iterator[tuple[TcpProxy, str]]:
    with scratch_database("inco_outage") as name:
        proxy = TcpProxy(*pg_host_port())
        try:
            yield proxy, f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}"
        finally:
            proxy.close()


def test_an_api_started_before_its_database_waits_for_it(
    pg_behind_proxy: tuple[TcpProxy, str], settings: Settings
) -> None:
    proxy, url = pg_behind_proxy  # not started: connections are refused
    app = create_app(settings.model_copy(update={"database_url": url}))
    app.state.migrator.every_s = 0.5
    with TestClient(app) as client:
        r = client.get("/v1/jobs", headers=auth("inco_whatever"))
        assert r.status_code == 503 and "store is not ready" in r.json()["detail"] and r.headers["Retry-After"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "not migrated yet" in ready.json()["schema"]
        assert ready.json()["database"] != "ok" and ready.json()["redis"] == "ok"
        assert client.get("/healthz").status_code == 200  # alive, so an orchestrator does not restart it
        proxy.start()
        wait_until(lambda: client.get("/readyz").status_code == 200, "migrated once the database answers", 30)
        engine = make_engine(url)
        token = make_team(engine, "alpha")
        engine.dispose()
        assert client.get("/v1/jobs", headers=auth(token)).json() == []


def test_a_database_lost_while_serving_is_a_503_and_comes_back(
    pg_behind_proxy: tuple[TcpProxy, str], settings: Settings
) -> None:
    proxy, url = pg_behind_proxy
    proxy.start()
    with TestClient(create_app(settings.model_copy(update={"database_url": url}))) as client:
        token = make_team(client.app.state.engine, "alpha")
        assert client.post("/v1/datasets", json={"name": "default", "path": "neu-cls"}, headers=auth(token)).is_success
        assert client.get("/v1/jobs", headers=auth(token)).status_code == 200
        proxy.cut()
        r = client.post("/v1/jobs", json={"spec": {"ratios": ["1:16"], "preset": "smoke"}}, headers=auth(token))
        assert r.status_code == 503 and "database" in r.json()["detail"], r.text
        assert client.get("/readyz").json()["database"] != "ok"
        time.sleep(1)
        proxy.restore()
        assert client.get("/v1/jobs", headers=auth(token)).json() == []  # nothing half-made
        assert client.get("/readyz").status_code == 200
