"""Schemathesis against the API's own OpenAPI document, in-process (real Redis database 13, SQLite):
generated requests, valid and invalid, to every operation with a valid token; no answer may be a 5xx.

Bounded for CI: ``MAX_EXAMPLES`` examples per operation, derandomized (the same cases every run)."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from redis import Redis
from schemathesis.checks import not_a_server_error
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.app import create_app
from server.settings import Settings
from tests.service_fixtures import make_team

pytestmark = pytest.mark.integration
REDIS_URL = os.environ.get("INCO_TEST_REDIS_SCHEMATHESIS", "redis://127.0.0.1:6379/13")
MAX_EXAMPLES = 20


@pytest.fixture
def api(neu_path: Path, tmp_path: Path) -> Iterator[tuple[FastAPI, str]]:
    """The app on a fresh SQLite store and a flushed Redis database, with a team whose small data set
    is registered as 'default' (so valid job requests are accepted and queued)."""
    Redis.from_url(REDIS_URL).flushdb()
    root = tmp_path / "root"
    for cls in ("crazing", "patches"):
        (root / "small" / cls).mkdir(parents=True)
        for i in (1, 2, 3):
            shutil.copy(neu_path / cls / f"{cls}_{i}.jpg", root / "small" / cls)
    app_settings = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'inco.db'}",
        redis_url=REDIS_URL,
        data_root=root,
        queue=f"inco-schemathesis-{secrets.token_hex(3)}",
    )
    with TestClient(create_app(app_settings)) as client:  # runs the migrations (lifespan)
        token = make_team(client.app.state.engine, "fuzz")
        r = client.post("/v1/datasets", json={"name": "default", "path": "small"}, headers=_auth(token))
        assert r.status_code == 201, r.text
        before, _late.app = _late.app, client.app
        try:
            yield client.app, token
        finally:
            _late.app = before


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class _LateApp:
    """An ASGI app whose target is set per test: the schema is loaded at import (pytest collects one
    test per operation from it), the app it calls is the test's own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


# the document does not depend on the settings; this app is never called for anything else
_doc_db = Path(tempfile.gettempdir()) / "inco-schemathesis-doc.db"  # never opened: no request reaches this app
_late = _LateApp(create_app(Settings(database_url=f"sqlite:///{_doc_db}", redis_url=REDIS_URL), run_migrations=False))
schema = schemathesis.openapi.from_asgi("/openapi.json", _late)
# archive bodies are bytes: send what is generated as it is (garbage archives are part of the test)
schemathesis.serializer.alias(["application/zip", "application/x-tar", "application/gzip"], "application/octet-stream")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_gets_a_server_error(case: schemathesis.Case, api: tuple[FastAPI, str]) -> None:
    case.call_and_validate(headers=_auth(api[1]), checks=[not_a_server_error])
