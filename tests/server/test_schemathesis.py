"""Schemathesis against the API's own OpenAPI document, in-process (real Redis database 13, SQLite).

Three runs, each failing on any 5xx and on any answer the document does not describe (its status code,
content type, body schema and required headers):

* every operation, ``MAX_EXAMPLES`` generated requests, valid and invalid, each sent with a token of
  one scope (read, submit, admin, or all three) drawn with the request, so routes answer callers that
  lack their scope too (a documented 403, never a 5xx);
* every operation, schemathesis's coverage cases (each bound and one past it, missing and wrongly
  typed values, unknown methods), with a token of every scope;
* stateful: ``STATEFUL_EXAMPLES`` chains of calls that follow the document's links (``POST /v1/jobs``
  to the routes of the job it made, ``POST /v1/tokens`` to revoking the token), with a token of
  every scope, each chain from the same state.

Bounded for CI (about a minute): one app, store and Redis database for the whole module; derandomized
(the same cases every run)."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from redis import Redis
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine
from sqlmodel import SQLModel
from starlette.types import ASGIApp, Receive, Scope, Send

from inco_core.config import METHODS
from server.api.app import create_app
from server.settings import Settings
from server.store.access import hash_token
from tests.service_fixtures import make_team

pytestmark = pytest.mark.integration
REDIS_URL = os.environ.get("INCO_TEST_REDIS_SCHEMATHESIS", "redis://127.0.0.1:6379/13")
MAX_EXAMPLES = 100
STATEFUL_EXAMPLES = 100
"""Scenarios of the stateful phase, each of at most ``STATEFUL_STEPS`` linked calls."""
STATEFUL_STEPS = 6
SCOPES = {"read": ["read"], "submit": ["submit"], "admin": ["admin"], "all": ["read", "submit", "admin"]}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
SETTINGS = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


class Service(NamedTuple):
    tokens: dict[str, str]
    """A token of each scope of ``SCOPES``, by the scope's name."""
    engine: Engine
    data_root: Path


@pytest.fixture(scope="module")
def service(neu_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One app for the module on a fresh SQLite store and a flushed Redis database, with one team that
    has a token of each scope, its small data set registered as 'default' (so valid job requests are
    accepted and queued) and limits high enough that they rarely answer 429."""
    Redis.from_url(REDIS_URL).flushdb()
    tmp = tmp_path_factory.mktemp("schemathesis")
    root = tmp / "root"
    for cls in ("crazing", "patches"):
        (root / "small" / cls).mkdir(parents=True)
        for i in (1, 2, 3):
            shutil.copy(neu_path / cls / f"{cls}_{i}.jpg", root / "small" / cls)
    app_settings = Settings(
        home=tmp / "home",
        database_url=f"sqlite:///{tmp / 'inco.db'}",
        redis_url=REDIS_URL,
        data_root=root,
        queue=f"inco-schemathesis-{secrets.token_hex(3)}",
        max_active_jobs=100_000,
        max_gpus=100_000,
    )
    with TestClient(create_app(app_settings)) as client:  # runs the migrations (lifespan)
        engine = client.app.state.engine
        by_scope = {name: make_team(engine, "fuzz", scopes) for name, scopes in SCOPES.items()}
        r = client.post("/v1/datasets", json={"name": "default", "path": "small"}, headers=_auth(by_scope["all"]))
        assert r.status_code == 201, r.text
        before, _late.app = _late.app, client.app
        try:
            yield Service(by_scope, engine, root)
        finally:
            _late.app = before
    Redis.from_url(REDIS_URL).flushdb()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _forget_what_calls_made(service: Service) -> None:
    """Back to the state the fixture left: no jobs, no tokens and data sets but the fixture's.

    Each stateful scenario starts from it, so its answers depend on its own calls only: Hypothesis
    fails a run whose scenarios draw differently when replayed (a job submitted again with the same
    Idempotency-Key is a 200 replay, not a 201, and offers other links)."""
    tables = SQLModel.metadata.tables
    kept = [hash_token(token) for token in service.tokens.values()]
    with service.engine.begin() as conn:
        for name in ("job_logs", "metrics", "results", "tune_trials", "artifacts", "jobs"):  # children first
            conn.execute(tables[name].delete())
        conn.execute(tables["api_tokens"].delete().where(tables["api_tokens"].c.token_hash.not_in(kept)))
        conn.execute(tables["api_tokens"].update().values(revoked_at=None))
        conn.execute(tables["datasets"].delete().where(tables["datasets"].c.name != "default"))
    shutil.rmtree(service.data_root / "uploads", ignore_errors=True)


class _LateApp:
    """An ASGI app whose target is set by the fixture: the schema is loaded at import (pytest collects
    one test per operation from it), the app it calls is the fixture's."""

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
SUBMIT = "POST /v1/jobs"
VALID_JOBS = st.fixed_dictionaries(
    {
        "kind_method": st.sampled_from(
            [("experiment", m) for m in METHODS] + [("pretrain", "inco"), ("finetune", "supervised")]
        ),
        "ratios": st.lists(st.sampled_from(["1:1", "1:4", "1:16", "1:256"]), min_size=1, max_size=3, unique=True),
        "seeds": st.lists(st.integers(0, 1000), min_size=1, max_size=3, unique=True),
    }
).map(
    lambda j: {
        "kind": j["kind_method"][0],
        "spec": {"method": j["kind_method"][1], "preset": "smoke", "ratios": j["ratios"], "seeds": j["seeds"]},
    }
)
"""Job requests the API accepts: a small part of what the body's schema allows (the data set must be
registered, ratios look like 1:16, overrides name fields of the preset), rarely generated alone."""


@schema.hook
def before_generate_body(context: schemathesis.HookContext, strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Generated job requests, and as many that the API accepts: jobs are made, and the links from
    them are followed."""
    if context.operation is not None and context.operation.label == SUBMIT:
        return st.one_of(strategy, VALID_JOBS)
    return strategy


@schema.parametrize()
@schema.given(scope=st.sampled_from(sorted(SCOPES)))
@settings(SETTINGS, max_examples=MAX_EXAMPLES)
def test_every_answer_is_documented(case: schemathesis.Case, scope: str, service: Service) -> None:
    case.call_and_validate(headers=_auth(service.tokens[scope]), checks=CHECKS)


@schema.parametrize()
@settings(SETTINGS, phases=[Phase.explicit])
def test_boundary_values_answer_as_documented(case: schemathesis.Case, service: Service) -> None:
    """Schemathesis's coverage cases, which it makes only for tests without ``schema.given``, with a
    token of every scope: each request gets past the scope check to the validation of its parameters."""
    case.call_and_validate(headers=_auth(service.tokens["all"]), checks=CHECKS)


def test_linked_calls_answer_as_documented(service: Service) -> None:
    """A token of every scope, so that jobs are made and the links from them can be followed."""
    headers = _auth(service.tokens["all"])

    class Calls(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            _forget_what_calls_made(service)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": headers}

        def validate_response(self, response: Any, case: schemathesis.Case, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, headers=headers, recorder=self.recorder)

    Calls.run(settings=settings(SETTINGS, max_examples=STATEFUL_EXAMPLES, stateful_step_count=STATEFUL_STEPS))
