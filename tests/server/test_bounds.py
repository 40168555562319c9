"""Every query and path parameter is bounded in the OpenAPI document, and the bounds hold on SQLite and
PostgreSQL: an integer past them (2**70, a negative, not an integer at all) or a malformed string is a
422 naming the parameter before the store sees it, a malformed job id is a 404 or a 422, and the
bounds themselves reach the store and answer 200. Never a 500."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.params import INT32_MAX
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from server.store.models import JobCreate
from tests.service_fixtures import auth, make_team

pytestmark = pytest.mark.integration
INT32_MIN = -(2**31)
LOCATIONS = ("path", "query", "header")
NOT_INTEGERS = ["abc", "1.5", "", "0x10"]


def _document(tmp_path: Path) -> dict[str, Any]:
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'doc.db'}"), run_migrations=False)
    return app.openapi()


def _schema(doc: dict[str, Any], param: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema: the one option of an optional one (``anyOf [..., null]``), resolved."""
    schema = param["schema"]
    options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    assert len(options) == 1, param
    option = options[0]
    if "$ref" in option:
        option = doc["components"]["schemas"][option["$ref"].rsplit("/", 1)[1]]
    return option


def _parameters(doc: dict[str, Any], kind: str) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(method, path, parameter, its schema) of every path, query and header parameter of type ``kind``."""
    found = []
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for param in operation.get("parameters", []):
                schema = _schema(doc, param)
                if param["in"] in LOCATIONS and schema.get("type") == kind:
                    found.append((method, path, param, schema))
    return found


def test_every_integer_parameter_has_both_bounds_within_32_bits(tmp_path: Path) -> None:
    ints = _parameters(_document(tmp_path), "integer")
    assert {(path, p["name"]) for _, path, p, _ in ints} >= {
        ("/v1/jobs", "limit"),
        ("/v1/jobs", "offset"),
        ("/v1/jobs/{job_id}/logs", "after"),
    }
    for method, path, param, schema in ints:
        where = f"{method.upper()} {path} {param['in']} {param['name']}"
        assert "minimum" in schema and "maximum" in schema, f"{where}: declare ge= and le= ({schema})"
        assert INT32_MIN <= schema["minimum"] <= schema["maximum"] <= INT32_MAX, where


def test_every_string_parameter_is_bounded(tmp_path: Path) -> None:
    """A string that reaches the store has a length, a pattern or a list of values."""
    for method, path, param, schema in _parameters(_document(tmp_path), "string"):
        assert {"maxLength", "pattern", "enum"} & set(schema), f"{method.upper()} {path} {param['name']}: {schema}"


def test_every_float_parameter_has_both_bounds(tmp_path: Path) -> None:
    """Floats (the predict route's conformal ``level``) are bounded on both sides, so NaN and infinity
    fail the bounds (tests/server/test_models.py sends them)."""
    floats = _parameters(_document(tmp_path), "number")
    assert {(path, p["name"]) for _, path, p, _ in floats} == {("/v1/models/{model_id}/predict", "level")}
    for method, path, param, schema in floats:
        where = f"{method.upper()} {path} {param['name']}"
        assert {"minimum", "exclusiveMinimum"} & set(schema), where
        assert {"maximum", "exclusiveMaximum"} & set(schema), where


@pytest.fixture
def token(client: TestClient) -> str:
    return make_team(client.app.state.engine, "alpha")


@pytest.fixture
def job_id(client: TestClient) -> str:
    """A queued job of team alpha, made in the store (no queue, no data set needed), with a log line."""
    with session_scope(client.app.state.engine) as s:
        team = access.ensure_team(s, name="alpha")
        body = JobCreate.model_validate({"spec": {"preset": "smoke"}})
        return access.create_job(s, team_id=team.id, request=body, spec=body.spec.model_dump(mode="json")).id


def _integer_urls(client: TestClient, job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, url with a ``{value}`` slot, the parameter's schema) of every integer parameter."""
    urls = []
    for method, path, param, schema in _parameters(client.app.openapi(), "integer"):
        if path.endswith("/predict"):
            continue  # a multipart POST: its bounds are checked in tests/server/test_models.py
        path = path.replace("{job_id}", job_id).replace("{fmt}", "png")
        if param["in"] == "path":
            urls.append((method, path.replace(f"{{{param['name']}}}", "{value}"), schema))
            continue
        assert param["in"] == "query", f"{path} {param['name']}: fill in a {param['in']} parameter here"
        path = path.replace("{model_id}", "1")
        urls.append((method, path + f"?{param['name']}={{value}}", schema))
    return urls


def test_integers_past_their_bounds_are_422_naming_the_parameter(client: TestClient, token: str, job_id: str) -> None:
    for method, url, schema in _integer_urls(client, job_id):
        name = url.rsplit("?", 1)[1].split("=")[0] if "?" in url else "model_id"
        not_integers = [v for v in NOT_INTEGERS if v or "?" in url]  # /v1/models/ (empty id) is the list
        for value in [2**70, -(2**70), 2**63, schema["maximum"] + 1, schema["minimum"] - 1, *not_integers]:
            r = client.request(method, url.format(value=value), headers=auth(token))
            assert r.status_code == 422, (url, value, r.status_code, r.text)
            assert r.json()["detail"].startswith(f"{name}: "), (url, value, r.text)
            assert [e.split(":")[0] for e in r.json()["errors"]] == [name], r.text


def test_integers_at_their_bounds_reach_the_store(client: TestClient, token: str, job_id: str) -> None:
    for method, url, schema in _integer_urls(client, job_id):
        for value in (schema["minimum"], schema["maximum"]):
            r = client.request(method, url.format(value=value), headers=auth(token))
            # 404: a model id in range that names no model, a plot of a job with nothing to draw (both reached
            # the store)
            assert r.status_code == (404 if "/models/" in url or "/plots/" in url else 200), (url, value, r.text)
    logs = client.get(f"/v1/jobs/{job_id}/logs", headers=auth(token)).json()
    assert len(logs) == 1 and logs[0]["message"].startswith("queued")


JOB_ROUTES = [
    ("get", ""),
    ("get", "/metrics"),
    ("get", "/logs"),
    ("get", "/results"),
    ("get", "/trials"),
    ("get", "/artifacts"),
    ("post", "/cancel"),
]


@pytest.mark.parametrize(
    "bad_id",
    ["nope", "0" * 32, "0" * 31 + "g", "a%00b", "%F0%9F%92%A9", "x" * 33, "9" * 40, "-1", "..%2F..%2Fetc"],
)
def test_malformed_job_ids_are_404_or_422_never_500(client: TestClient, token: str, bad_id: str) -> None:
    for method, tail in JOB_ROUTES:
        r = client.request(method, f"/v1/jobs/{bad_id}{tail}", headers=auth(token))
        assert r.status_code in (404, 422), (method, tail, bad_id, r.status_code, r.text)
        if r.status_code == 422:
            assert r.json()["detail"].startswith("job_id: "), r.text


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("/v1/jobs/{job}/metrics?stage=a%00b", "stage"),
        ("/v1/jobs/{job}/metrics?stage=" + "p" * 65, "stage"),
        ("/v1/results?dataset=a%00b", "dataset"),
        ("/v1/results?dataset=" + "d" * 65, "dataset"),
        ("/v1/results?method=a%00b", "method"),
        ("/v1/results?method=" + "m" * 33, "method"),
        ("/v1/results?ratio=1:%00", "ratio"),
        ("/v1/results?ratio=1:" + "6" * 40, "ratio"),
        ("/v1/artifacts?job_id=a%00b", "job_id"),
    ],
)
def test_string_filters_past_their_bounds_are_422_naming_the_parameter(
    client: TestClient, token: str, job_id: str, url: str, name: str
) -> None:
    """PostgreSQL refuses a NUL byte in a string with an error: it must never get one."""
    r = client.get(url.format(job=job_id), headers=auth(token))
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"{name}: "), r.text
