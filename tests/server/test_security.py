"""Tokens (hashed at rest, scoped, revocable, managed through /v1/tokens and `inco admin token`),
no token in logs or job specs, CORS off by default, and security headers on every answer."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from inco_core.errors import ConfigError
from server import logs
from server.api.app import create_app
from server.api.security import DOCS_CSP
from server.settings import Settings
from server.store import access
from server.store.db import make_engine, session_scope
from tests.server.test_isolation import app_routes
from tests.service_fixtures import auth, make_team

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SMOKE = {"spec": {"ratios": ["1:16"], "preset": "smoke"}}


def _with_data(client: TestClient, token: str) -> str:
    r = client.post("/v1/datasets", json={"name": "default", "path": "neu-cls"}, headers=auth(token))
    assert r.status_code == 201, r.text
    return token


# -- tokens in the store ------------------------------------------------------------------------
def test_tokens_are_stored_as_sha256_only(engine) -> None:
    with session_scope(engine) as s:
        token = access.create_token(s, team=access.ensure_team(s, name="alpha"), name="ci")
    with engine.connect() as conn:
        rows = [tuple(map(str, r)) for r in conn.execute(text("SELECT * FROM api_tokens")).all()]
    assert len(rows) == 1
    assert hashlib.sha256(token.encode()).hexdigest() in rows[0]
    assert not [v for v in rows[0] if token in v]  # the plain token is in no column
    with session_scope(engine) as s:
        team, row = access.authenticate(s, token=token)
        assert team.name == "alpha" and row.scopes == ["read", "submit"] and row.prefix == token[:12]
        assert access.authenticate(s, token=token[:-1]) is None


def test_scopes_are_checked_and_kept_in_one_order(engine) -> None:
    assert access.check_scopes(None) == ["read", "submit"]
    assert access.check_scopes(["admin", "read", "admin"]) == ["read", "admin"]
    with pytest.raises(ConfigError, match=r"unknown scope\(s\) \['delete'\]; choose from read, submit, admin, predict"):
        access.check_scopes(["read", "delete"])
    with pytest.raises(ConfigError, match="at least one scope"):
        access.check_scopes([])
    with session_scope(engine) as s, pytest.raises(ConfigError):
        access.create_token(s, team=access.ensure_team(s, name="a"), scopes=["root"])


def test_revoke_by_prefix_can_be_limited_to_a_team(engine) -> None:
    with session_scope(engine) as s:
        token = access.create_token(s, team=access.ensure_team(s, name="a"))
        other = access.ensure_team(s, name="b")
        assert access.revoke_token(s, prefix=token[:12], team_id=other.id) == 0
        assert access.team_for_token(s, token=token).name == "a"
        assert access.revoke_token(s, prefix=token[:12], team_id=access.ensure_team(s, name="a").id) == 1
        assert access.team_for_token(s, token=token) is None


# -- scopes on every route ----------------------------------------------------------------------
def required_scope(method: str, path: str) -> str:
    if path.startswith("/v1/tokens"):
        return "admin"
    if path.endswith("/predict"):
        return "predict"
    return "read" if method == "GET" else "submit"


def test_every_v1_route_needs_its_scope(client: TestClient) -> None:
    engine = client.app.state.engine
    only = {scope: make_team(engine, "alpha", scopes=[scope]) for scope in ("read", "submit", "admin", "predict")}
    routes = sorted({(m, p) for m, p, _ in app_routes(client.app) if p.startswith("/v1")})
    assert len(routes) >= 15
    for method, path in routes:
        need = required_scope(method, path)
        url = path.format(job_id="nope", prefix="inco_abcdefg", model_id=424242, fmt="png")
        for scope, token in only.items():
            r = client.request(method, url, headers=auth(token), json={})
            if scope == need:
                assert r.status_code != 403, (method, path, r.text)
            else:
                assert r.status_code == 403, (method, path, scope, r.text)
                detail = r.json()["detail"]
                assert f"lacks the {need!r} scope" in detail and f"--scope {need}" in detail, detail
                assert token not in detail and token[:12] in detail


def _scopes_required(dependant) -> set[str]:
    """The scopes the ``require(...)`` dependencies of a route (at any depth) ask for."""
    found = set()
    for dep in dependant.dependencies:
        name = getattr(dep.call, "__name__", "")
        if name.startswith("require_"):
            found.add(name.removeprefix("require_"))
        found |= _scopes_required(dep)
    return found


def test_every_v1_route_declares_its_scope(client: TestClient) -> None:
    """Every /v1 route (those that only some bodies reach, like an archive upload, too) depends on
    exactly the scope it needs."""
    seen = 0
    for method, path, route in app_routes(client.app):
        if path.startswith("/v1"):
            assert _scopes_required(route.dependant) == {required_scope(method, path)}, (method, path, route)
            seen += 1
    assert seen >= 15


def test_a_read_only_token_reads_but_cannot_submit(client: TestClient) -> None:
    engine = client.app.state.engine
    full = _with_data(client, make_team(engine, "alpha"))
    reader = make_team(engine, "alpha", scopes=["read"])
    job = client.post("/v1/jobs", json=SMOKE, headers=auth(full)).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(reader)).json()["id"] == job["id"]
    r = client.post("/v1/jobs", json=SMOKE, headers=auth(reader))
    assert r.status_code == 403 and "'submit' scope" in r.json()["detail"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(reader)).status_code == 403
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(reader)).json()["status"] == "queued"
    assert len(client.get("/v1/jobs", headers=auth(reader)).json()) == 1  # nothing was stored


# -- /v1/tokens ---------------------------------------------------------------------------------
def test_admin_lists_creates_and_revokes_tokens(client: TestClient) -> None:
    admin = make_team(client.app.state.engine, "alpha")
    h = auth(admin)
    r = client.post("/v1/tokens", json={"name": "line 3 bot", "scopes": ["submit", "read"]}, headers=h)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["token"].startswith("inco_") and made["prefix"] == made["token"][:12]
    assert made["scopes"] == ["read", "submit"] and made["name"] == "line 3 bot" and made["revoked_at"] is None
    assert client.get("/v1/jobs", headers=auth(made["token"])).status_code == 200
    assert client.get("/v1/tokens", headers=auth(made["token"])).status_code == 403  # no admin scope
    listed = client.get("/v1/tokens", headers=h).json()
    assert [t["prefix"] for t in listed] == [admin[:12], made["prefix"]]
    assert set(listed[0]) == {"prefix", "name", "scopes", "created_at", "revoked_at"}
    text_of_list = client.get("/v1/tokens", headers=h).text
    assert made["token"] not in text_of_list and hashlib.sha256(made["token"].encode()).hexdigest() not in text_of_list
    assert client.post("/v1/tokens", json={}, headers=h).json()["scopes"] == ["read", "submit"]

    r = client.post(f"/v1/tokens/{made['prefix']}/revoke", headers=h)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    r = client.get("/v1/jobs", headers=auth(made["token"]))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    r = client.post(f"/v1/tokens/{made['prefix']}/revoke", headers=h)
    assert r.status_code == 409 and "revoked already" in r.json()["detail"]
    r = client.post("/v1/tokens/inco_zzzzzzz/revoke", headers=h)
    assert r.status_code == 404 and "GET /v1/tokens" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ({"scopes": ["root"]}, "scopes.0: Input should be 'read', 'submit', 'admin' or 'predict'"),
        ({"scopes": []}, "scopes: List should have at least 1 item"),
        ({"scopes": "read"}, "scopes"),
        ({"name": "x" * 200}, "name: String should have at most 128 characters"),
        ({"team": "beta"}, "team: unknown field"),
        ({"name": "a\u0000b"}, "name: control characters (newlines, NUL, ...) are not allowed"),
    ],
)
def test_bad_token_requests_name_the_field(client: TestClient, body: dict, expect: str) -> None:
    h = auth(make_team(client.app.state.engine, "alpha"))
    r = client.post("/v1/tokens", json=body, headers=h)
    assert r.status_code == 422 and expect in r.json()["detail"], r.text
    assert len(client.get("/v1/tokens", headers=h).json()) == 1


def test_revoke_wants_the_prefix_not_the_token(client: TestClient) -> None:
    """A whole token in a URL would land in proxies' access logs: only the 12-character prefix is taken."""
    admin = make_team(client.app.state.engine, "alpha")
    r = client.post(f"/v1/tokens/{admin}/revoke", headers=auth(admin))
    assert r.status_code == 422 and "prefix" in r.json()["detail"]
    assert client.get("/v1/tokens", headers=auth(admin)).status_code == 200


# -- no secret in logs or specs -----------------------------------------------------------------
def test_the_token_is_in_no_log_line_job_spec_or_job_log(client: TestClient, caplog) -> None:
    token = _with_data(client, make_team(client.app.state.engine, "alpha"))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    logging.getLogger().addHandler(handler)
    caplog.set_level(logging.DEBUG)
    try:
        job = client.post("/v1/jobs", json=SMOKE, headers=auth(token)).json()
        for path in ("", "/logs", "/metrics", "/results", "/artifacts"):
            assert client.get(f"/v1/jobs/{job['id']}{path}", headers=auth(token)).status_code == 200
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(token))
        bad = token[:-4] + "abcd"
        assert client.get("/v1/jobs", headers=auth(bad)).status_code == 401
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    requests = [json.loads(line) for line in lines if '"route"' in line]
    assert len(requests) >= 8 and {r["team"] for r in requests if r["status"] < 400} == {"alpha"}
    everything = stream.getvalue() + caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    for secret in (token, bad, token[12:]):
        assert secret not in everything
    assert "authorization" not in everything.lower() and "bearer" not in everything.lower()
    stored = client.get(f"/v1/jobs/{job['id']}", headers=auth(token)).text
    stored += client.get(f"/v1/jobs/{job['id']}/logs", headers=auth(token)).text
    assert token not in stored and token[12:] not in stored
    with session_scope(client.app.state.engine) as s:
        row = access.get_job(s, job_id=job["id"], team_id=None)
        assert token not in json.dumps(row.spec) and token not in json.dumps(row.outputs)


# -- CORS and headers ---------------------------------------------------------------------------
def test_cors_is_off_by_default(client: TestClient) -> None:
    origin = {"Origin": "https://evil.example"}
    r = client.get("/healthz", headers=origin)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = client.options(
        "/v1/jobs", headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x"}
    )
    assert "access-control-allow-origin" not in r.headers


def test_cors_answers_listed_origins_only(settings: Settings) -> None:
    allowed = "https://dash.plant.example"
    with TestClient(create_app(settings.model_copy(update={"cors_origins": [allowed]}))) as c:
        r = c.get("/healthz", headers={"Origin": allowed})
        assert r.headers["access-control-allow-origin"] == allowed
        assert "access-control-allow-credentials" not in r.headers
        r = c.options(
            "/v1/jobs",
            headers={
                "Origin": allowed,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        assert r.headers["x-frame-options"] == "DENY"


def test_security_headers_on_every_answer(client: TestClient) -> None:
    token = make_team(client.app.state.engine, "alpha")
    answers = {
        "ok": client.get("/v1/jobs", headers=auth(token)),
        "401": client.get("/v1/jobs"),
        "404": client.get("/v1/jobs/nope", headers=auth(token)),
        "422": client.post("/v1/jobs", content=b"{", headers={**auth(token), "Content-Type": "application/json"}),
        "no route": client.get("/nowhere"),
        "health": client.get("/healthz"),
        "metrics": client.get("/metrics"),
    }
    for what, r in answers.items():
        assert r.headers["x-content-type-options"] == "nosniff", what
        assert r.headers["x-frame-options"] == "DENY", what
        assert r.headers["referrer-policy"] == "no-referrer", what
        assert "default-src 'none'" in r.headers["content-security-policy"], what
    for what in ("ok", "401", "404", "422", "metrics"):
        assert answers[what].headers["cache-control"] == "no-store", what
    assert "cache-control" not in answers["health"].headers


def test_the_docs_still_load_under_their_policy(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200
        policy = r.headers["content-security-policy"]
        assert policy == DOCS_CSP and "frame-ancestors 'none'" in policy
        for url in re.findall(r'(?:src|href)="(https://[^"]+)"', r.text):  # every outside file the page loads
            host = "/".join(url.split("/")[:3])
            assert host in policy, (page, url)
    assert client.get("/openapi.json").headers["content-security-policy"] != DOCS_CSP


# -- the CLI ------------------------------------------------------------------------------------
def _inco(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INCO_")}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO,
        env={**env, "INCO_HOME": str(home), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_creates_scoped_tokens_and_lists_them(tmp_path: Path) -> None:
    made = _inco(tmp_path, "admin", "token", "create", "--team", "plant-7", "--scope", "read", "--name", "viewer")
    assert made.returncode == 0, made.stderr
    reader = made.stdout.strip()
    default = _inco(tmp_path, "admin", "token", "create", "--team", "plant-7").stdout.strip()
    admin = _inco(tmp_path, "admin", "token", "create", "--team", "plant-7", "--scope", "admin", "--scope", "read")
    engine = make_engine(f"sqlite:///{tmp_path / 'inco.db'}")
    try:
        with session_scope(engine) as s:
            assert access.authenticate(s, token=reader)[1].scopes == ["read"]
            assert access.authenticate(s, token=default)[1].scopes == ["read", "submit"]
            assert access.authenticate(s, token=admin.stdout.strip())[1].scopes == ["read", "admin"]
    finally:
        engine.dispose()
    listed = _inco(tmp_path, "admin", "token", "list", "--team", "plant-7")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].split() == ["prefix", "scopes", "created", "revoked", "name"]
    assert lines[1].split()[:2] == [reader[:12], "read"] and lines[1].endswith("viewer")
    assert reader not in listed.stdout and default not in listed.stdout
    assert _inco(tmp_path, "admin", "token", "revoke", reader[:12]).returncode == 0
    assert "active" not in _inco(tmp_path, "admin", "token", "list", "--team", "plant-7").stdout.splitlines()[1]
    bad = _inco(tmp_path, "admin", "token", "create", "--team", "plant-7", "--scope", "root")
    assert bad.returncode == 1 and "unknown scope(s) ['root']" in bad.stderr and "Traceback" not in bad.stderr
    none = _inco(tmp_path, "admin", "token", "list", "--team", "nobody")
    assert none.returncode == 1 and "no team named 'nobody'" in none.stderr


def test_the_local_stack_token_has_every_scope(settings: Settings, engine) -> None:
    """`inco up` keeps its token in INCO_HOME/token: every scope; a kept token that lacks one (one from
    before the predict scope) or was revoked is replaced."""
    from cli.stack import _local_token

    settings.home.mkdir(parents=True, exist_ok=True)
    token = _local_token(settings, engine)
    with session_scope(engine) as s:
        assert access.authenticate(s, token=token)[1].scopes == ["read", "submit", "admin", "predict"]
    assert _local_token(settings, engine) == token  # kept
    assert (settings.home / "token").stat().st_mode & 0o777 == 0o600
    with session_scope(engine) as s:  # a token from before scopes existed: read and submit only
        old = access.create_token(s, team=access.ensure_team(s, name="local"))
    (settings.home / "token").write_text(old)
    newer = _local_token(settings, engine)
    assert newer not in (old, token)
    with session_scope(engine) as s:
        assert access.authenticate(s, token=old) is None  # the replaced one is revoked
    with session_scope(engine) as s:
        access.revoke_token(s, prefix=newer[:12])
    latest = _local_token(settings, engine)
    with session_scope(engine) as s:
        assert latest != newer and access.authenticate(s, token=latest)[1].scopes == [
            "read",
            "submit",
            "admin",
            "predict",
        ]
