"""Team isolation on every /v1 route: team A asks about team B's jobs, data sets, results, artifacts,
trials and tokens, and gets 404 (a thing of another team does not exist for it) or a list without
them; B's things are unchanged afterwards.

The table of checks is keyed by the app's routes: a new /v1 route without a cross-team check here
fails :func:`test_every_v1_route_has_a_cross_team_check`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute, Route

from server.store import access
from server.store.db import session_scope
from server.store.models import Artifact, Model
from tests.server.test_store import _result_dict
from tests.service_fixtures import auth, make_team

pytestmark = pytest.mark.integration


@dataclass
class TeamB:
    """What team B owns; team A's requests name these."""

    token: str
    job_id: str  # a tune job with a metric, a log, a trial, a result and an artifact
    dataset: str = "b-private"
    artifact_key: str = "b-backbone-key"
    model_id: int = 0

    @property
    def prefix(self) -> str:
        return self.token[:12]

    def fill(self, template: str) -> str:
        return template.format(job_id=self.job_id, prefix=self.prefix, model_id=self.model_id)

    @property
    def secrets(self) -> list[str]:
        """Strings that must never appear in an answer to team A."""
        return [self.job_id, self.dataset, self.artifact_key, self.prefix]


@pytest.fixture
def teams(client: TestClient) -> tuple[dict[str, str], TeamB]:
    """Team A (alpha) with a data set; team B (beta) with one of everything."""
    engine = client.app.state.engine
    a, b = make_team(engine, "alpha"), make_team(engine, "beta")
    for token, name in ((a, "default"), (b, "b-private")):
        r = client.post("/v1/datasets", json={"name": name, "path": "neu-cls"}, headers=auth(token))
        assert r.status_code == 201, r.text
    body = {"kind": "tune", "spec": {"preset": "smoke", "data": {"dataset": "b-private"}}, "tune": {"trials": 2}}
    r = client.post("/v1/jobs", json=body, headers=auth(b))
    assert r.status_code == 201, r.text
    beta = TeamB(token=b, job_id=r.json()["id"])
    with session_scope(engine) as s:
        job = access.get_job(s, job_id=beta.job_id, team_id=None)
        access.save_trial(s, job_id=job.id, number=1, trial_id="t1", params={"lr": 0.1}, epochs=2, score=0.5)
        access.add_results(s, job=job, result=_result_dict([0.5]), dataset="b-private")
        access.add_artifact(
            s,
            artifact=Artifact(
                team_id=job.team_id,
                job_id=job.id,
                kind="backbone",
                key=beta.artifact_key,
                method="inco",
                seed=0,
                path="/artifacts/b.pt",
                size_bytes=10,
            ),
        )
        classifier = access.add_artifact(
            s,
            artifact=Artifact(
                team_id=job.team_id,
                job_id=job.id,
                kind="classifier",
                key="b-model",
                method="inco",
                seed=0,
                path="/artifacts/b-model.pt",
                size_bytes=10,
            ),
        )
        model = access.add_model(
            s,
            model=Model(
                team_id=job.team_id,
                job_id=job.id,
                artifact_id=classifier.id,
                dataset="b-private",
                preset="smoke",
                method="inco",
                variant="InCo with DWV",
                ratio="1:16",
                eval="finetune",
                seed=0,
                classes=["a", "b"],
                image_size=32,
                normalisation={},
                accuracy=0.5,
                per_class_recall={"a": 0.5, "b": 0.5},
                code_version="v",
            ),
        )
        beta.model_id = model.id
    return auth(a), beta


Check = Callable[[TestClient, dict[str, str], TeamB], None]


def not_found(method: str, template: str, expect: str) -> Check:
    """A's request about B's thing is a 404 that says ``expect`` and names none of B's other things."""

    def check(client: TestClient, a: dict[str, str], b: TeamB) -> None:
        r = client.request(method, b.fill(template), headers=a)
        assert r.status_code == 404 and expect in r.json()["detail"], (method, template, r.text)

    return check


def listing(path: str) -> Check:
    """A's list holds none of B's things (and B's own list does, so the check can fail)."""

    def check(client: TestClient, a: dict[str, str], b: TeamB) -> None:
        mine = client.get(path, headers=a)
        assert mine.status_code == 200, mine.text
        assert not [s for s in b.secrets if s in mine.text], (path, mine.text)
        theirs = client.get(path, headers=auth(b.token))
        assert theirs.status_code == 200 and any(s in theirs.text for s in b.secrets), (path, theirs.text)

    return check


def submit_naming_b(client: TestClient, a: dict[str, str], b: TeamB) -> None:
    """A job of A cannot use B's data set, pretrain job or tune job."""
    for body, expect in (
        ({"spec": {"preset": "smoke", "data": {"dataset": b.dataset}}}, "no data set named 'b-private'"),
        ({"kind": "finetune", "pretrained_job": b.job_id, "spec": {"preset": "smoke"}}, "no job"),
        ({"from_tune": b.job_id, "spec": {}}, "no job"),
    ):
        r = client.post("/v1/jobs", json=body, headers=a)
        assert r.status_code == 422 and expect in r.json()["detail"], (body, r.text)
    assert client.get("/v1/jobs", headers=a).json() == []


def register_b_name(client: TestClient, a: dict[str, str], b: TeamB) -> None:
    """Data set names are per team: A registering B's name makes A's own, B's stays as it was."""
    before = client.get("/v1/datasets", headers=auth(b.token)).json()
    r = client.post("/v1/datasets", json={"name": b.dataset, "path": "neu-cls"}, headers=a)
    assert r.status_code == 201, r.text
    assert client.get("/v1/datasets", headers=auth(b.token)).json() == before
    r = client.post("/v1/datasets", json={"name": "x", "path": "neu-cls", "team": "beta"}, headers=a)
    assert r.status_code == 422 and "unknown field" in r.json()["detail"]


def create_token_for_b(client: TestClient, a: dict[str, str], b: TeamB) -> None:
    """A token A creates is A's: it cannot name another team, and B's list does not show it."""
    r = client.post("/v1/tokens", json={"team": "beta"}, headers=a)
    assert r.status_code == 422 and "unknown field" in r.json()["detail"]
    r = client.post("/v1/tokens", json={"name": "a-ci"}, headers=a)
    assert r.status_code == 201, r.text
    assert client.get("/v1/jobs", headers=auth(r.json()["token"])).json() == []  # sees A's (no) jobs
    assert "a-ci" not in client.get("/v1/tokens", headers=auth(b.token)).text


def figure4_of_b(client: TestClient, a: dict[str, str], b: TeamB) -> None:
    """A's Figure 4 draws A's results only: A has none (404), B's draws B's."""
    mine = client.get("/v1/results/figure4.png", headers=a)
    assert mine.status_code == 404 and "no results yet" in mine.json()["detail"], mine.text
    theirs = client.get("/v1/results/figure4.png", headers=auth(b.token))
    assert theirs.status_code == 200 and theirs.headers["content-type"] == "image/png", theirs.text


def predict_b_model(client: TestClient, a: dict[str, str], b: TeamB) -> None:
    """A cannot run B's model: 404, as for a model that does not exist."""
    files = [("files", ("a.png", b"\x89PNG", "image/png"))]
    r = client.post(f"/v1/models/{b.model_id}/predict", files=files, headers=a)
    assert r.status_code == 404 and "no model" in r.json()["detail"], r.text


CROSS_TEAM: dict[tuple[str, str], Check] = {
    ("GET", "/v1/jobs"): listing("/v1/jobs"),
    ("POST", "/v1/jobs"): submit_naming_b,
    ("GET", "/v1/jobs/{job_id}"): not_found("GET", "/v1/jobs/{job_id}", "no job"),
    ("GET", "/v1/jobs/{job_id}/metrics"): not_found("GET", "/v1/jobs/{job_id}/metrics", "no job"),
    ("GET", "/v1/jobs/{job_id}/logs"): not_found("GET", "/v1/jobs/{job_id}/logs", "no job"),
    ("GET", "/v1/jobs/{job_id}/results"): not_found("GET", "/v1/jobs/{job_id}/results", "no job"),
    ("GET", "/v1/jobs/{job_id}/trials"): not_found("GET", "/v1/jobs/{job_id}/trials", "no job"),
    ("GET", "/v1/jobs/{job_id}/artifacts"): not_found("GET", "/v1/jobs/{job_id}/artifacts", "no job"),
    ("POST", "/v1/jobs/{job_id}/cancel"): not_found("POST", "/v1/jobs/{job_id}/cancel", "no job"),
    ("GET", "/v1/results"): listing("/v1/results"),
    ("GET", "/v1/results/figure4.{fmt}"): figure4_of_b,
    ("GET", "/v1/jobs/{job_id}/plots/curves.{fmt}"): not_found("GET", "/v1/jobs/{job_id}/plots/curves.png", "no job"),
    ("GET", "/v1/jobs/{job_id}/plots/confusion.{fmt}"): not_found(
        "GET", "/v1/jobs/{job_id}/plots/confusion.svg", "no job"
    ),
    ("GET", "/v1/jobs/{job_id}/plots/embedding.{fmt}"): not_found(
        "GET", "/v1/jobs/{job_id}/plots/embedding.png", "no job"
    ),
    ("GET", "/v1/jobs/{job_id}/plots/trials.{fmt}"): not_found("GET", "/v1/jobs/{job_id}/plots/trials.png", "no job"),
    ("GET", "/v1/datasets"): listing("/v1/datasets"),
    ("GET", "/v1/artifacts"): listing("/v1/artifacts"),
    ("GET", "/v1/tokens"): listing("/v1/tokens"),
    ("POST", "/v1/tokens"): create_token_for_b,
    ("POST", "/v1/tokens/{prefix}/revoke"): not_found("POST", "/v1/tokens/{prefix}/revoke", "no token of your team"),
    ("GET", "/v1/models"): listing("/v1/models"),
    ("GET", "/v1/models/{model_id}"): not_found("GET", "/v1/models/{model_id}", "no model"),
    ("GET", "/v1/models/{model_id}/card"): not_found("GET", "/v1/models/{model_id}/card", "no model"),
    ("GET", "/v1/models/{model_id}/file"): not_found("GET", "/v1/models/{model_id}/file", "no model"),
    ("POST", "/v1/models/{model_id}/predict"): predict_b_model,
    ("POST", "/v1/datasets"): register_b_name,  # last: from here on A has a data set named like B's
}
"""Run in this order: what A's request about B's thing must get, per route."""


def app_routes(app: FastAPI) -> list[tuple[str, str, BaseRoute]]:
    """(method, path template, route) of every route, those of included routers too (FastAPI >= 0.16x
    keeps included routers as one entry of ``app.routes``)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is flat
        found = [(r.methods or set(), r.path, r) for r in app.routes if isinstance(r, Route)]
    else:
        found = [(c.methods or set(), c.path, c.original_route) for c in iter_route_contexts(app.routes)]
    return [(m, path, route) for methods, path, route in found for m in sorted(methods) if m != "HEAD"]


def v1_routes(app: FastAPI) -> set[tuple[str, str]]:
    return {(method, path) for method, path, _ in app_routes(app) if path.startswith("/v1")}


def test_every_v1_route_has_a_cross_team_check(client: TestClient) -> None:
    routes = v1_routes(client.app)
    missing = sorted(routes - set(CROSS_TEAM))
    assert not missing, f"add a cross-team check to CROSS_TEAM in {__file__} for {missing}"
    stale = sorted(set(CROSS_TEAM) - routes)
    assert not stale, f"CROSS_TEAM checks routes the app does not have: {stale}"
    with_params = {r for r in routes if "{" in r[1]}
    assert with_params and with_params <= set(CROSS_TEAM)


def test_team_a_cannot_reach_team_b_on_any_route(client: TestClient, teams: tuple[dict[str, str], TeamB]) -> None:
    a, b = teams
    routes = v1_routes(client.app)
    for route, check in CROSS_TEAM.items():
        if route in routes:
            check(client, a, b)
    # B's things are as they were: its job still queued, its token still valid, its result still listed
    bh = auth(b.token)
    assert client.get(f"/v1/jobs/{b.job_id}", headers=bh).json()["status"] == "queued"
    assert [t["revoked_at"] for t in client.get("/v1/tokens", headers=bh).json()] == [None]
    assert len(client.get(f"/v1/jobs/{b.job_id}/results", headers=bh).json()) == 1
    keys = [b.artifact_key, "b-model"]
    assert [x["key"] for x in client.get(f"/v1/jobs/{b.job_id}/artifacts", headers=bh).json()] == keys
    assert [x["key"] for x in client.get(f"/v1/artifacts?job_id={b.job_id}", headers=bh).json()] == keys
    assert [m["id"] for m in client.get("/v1/models", headers=bh).json()] == [b.model_id]
    assert [t["number"] for t in client.get(f"/v1/jobs/{b.job_id}/trials", headers=bh).json()] == [1]


def test_artifact_lists_hide_server_paths(client: TestClient, teams: tuple[dict[str, str], TeamB]) -> None:
    _, b = teams
    r = client.get("/v1/artifacts", headers=auth(b.token))
    assert r.status_code == 200 and len(r.json()) == 2
    assert "path" not in r.json()[0] and "/artifacts/b.pt" not in r.text and "/artifacts/b-model.pt" not in r.text
    assert client.get(f"/v1/artifacts?job_id={'0' * 32}", headers=auth(b.token)).json() == []
    for url in ("/v1/artifacts?job_id=a%00b", "/v1/jobs/a%00b/artifacts"):  # PostgreSQL refuses NUL bytes
        r = client.get(url, headers=auth(b.token))
        assert r.status_code == 422 and "job_id" in r.json()["detail"], r.text
