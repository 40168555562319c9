"""The /v1 API on SQLite and PostgreSQL with real Redis: every route, auth, team isolation,
validation messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue

from server.api.app import create_app
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from tests.service_fixtures import auth, team_with_dataset

pytestmark = pytest.mark.integration
SMOKE = {"spec": {"ratios": ["1:16"], "preset": "smoke"}}


@pytest.fixture
def tokens(client: TestClient) -> dict[str, str]:
    """Two teams, each with the NEU-CLS images registered as 'default'."""
    return {name: team_with_dataset(client, name) for name in ("alpha", "beta")}


def _submit(client: TestClient, token: str, body: dict | None = None) -> dict:
    r = client.post("/v1/jobs", json=body or SMOKE, headers=auth(token))
    assert r.status_code == 201, r.text
    return r.json()


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["database"] == "ok" and r.json()["redis"] == "ok"


def test_every_v1_route_needs_a_valid_token(client: TestClient, tokens: dict[str, str]) -> None:
    routes = [
        ("get", "/v1/jobs"),
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs/x"),
        ("get", "/v1/jobs/x/metrics"),
        ("get", "/v1/jobs/x/logs"),
        ("get", "/v1/jobs/x/results"),
        ("post", "/v1/jobs/x/cancel"),
        ("get", "/v1/jobs/x/trials"),
        ("get", "/v1/results"),
        ("get", "/v1/datasets"),
        ("post", "/v1/datasets"),
    ]
    for method, path in routes:
        for headers in ({}, auth("inco_not-a-token"), {"Authorization": "Basic abc"}):
            r = client.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, r.text)
            assert "token" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"


def test_submit_list_get_cancel(client: TestClient, tokens: dict[str, str], redis_db: Redis, settings) -> None:
    job = _submit(client, tokens["alpha"])
    assert job["status"] == "queued" and job["team"] == "alpha" and job["kind"] == "experiment"
    assert job["spec"]["data"] == {
        "path": job["spec"]["data"]["path"],
        "dataset": "default",
        "split_seed": 0,
        "train_fraction": 0.6,
        "on_corrupt": "fail",
    }
    assert Queue(settings.queue, connection=redis_db).job_ids == [job["id"]]  # the queue carries the id
    h = auth(tokens["alpha"])
    assert [j["id"] for j in client.get("/v1/jobs", headers=h).json()] == [job["id"]]
    assert client.get("/v1/jobs?status=running", headers=h).json() == []
    assert client.get(f"/v1/jobs/{job['id']}", headers=h).json()["status"] == "queued"
    assert client.get(f"/v1/jobs/{job['id']}/metrics", headers=h).json() == []
    assert client.get(f"/v1/jobs/{job['id']}/results", headers=h).json() == []
    assert "queued" in client.get(f"/v1/jobs/{job['id']}/logs", headers=h).json()[0]["message"]
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert Queue(settings.queue, connection=redis_db).job_ids == []  # taken off the queue
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert r.status_code == 409 and "already ended canceled" in r.json()["detail"]


def test_a_team_sees_only_its_own_things(client: TestClient, tokens: dict[str, str]) -> None:
    job = _submit(client, tokens["alpha"])
    b = auth(tokens["beta"])
    for path in ("", "/metrics", "/logs", "/results"):
        r = client.get(f"/v1/jobs/{job['id']}{path}", headers=b)
        assert r.status_code == 404 and "no job" in r.json()["detail"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=b).status_code == 404
    assert client.get("/v1/jobs", headers=b).json() == []
    r = client.post("/v1/jobs", json={"kind": "finetune", "pretrained_job": job["id"], **SMOKE}, headers=b)
    assert r.status_code == 422 and "no job" in r.json()["detail"]
    with session_scope(client.app.state.engine) as s:  # a result of alpha's
        from tests.server.test_store import _result_dict

        access.add_results(
            s, job=access.get_job(s, job_id=job["id"], team_id=None), result=_result_dict([0.5]), dataset="default"
        )
    assert client.get("/v1/results", headers=b).json() == []
    assert len(client.get("/v1/results", headers=auth(tokens["alpha"])).json()) == 1
    client.post("/v1/datasets", json={"name": "mine", "path": "neu-cls"}, headers=b)
    assert [d["name"] for d in client.get("/v1/datasets", headers=auth(tokens["alpha"])).json()] == ["default"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"spec": {"ratios": ["1:0"]}}, "spec.ratios.0: ratio 1:N needs N between 1 and 256 (got '1:0')"),
        ({"spec": {"ratios": ["16"]}}, "spec.ratios.0: ratio must look like 1:16 (got '16')"),
        ({"spec": {"ratios": ["1:1000"]}}, "spec.ratios.0: ratio 1:N needs N between 1 and 256"),
        ({"spec": {"method": "byol"}}, "spec.method: must be one of 'inco', 'simclr'"),
        ({"spec": {"data": {"dataset": "nope"}}}, "spec.data.dataset: no data set named 'nope' (registered: default)"),
        ({"spec": {"data": {"path": "/etc"}}}, "spec.data.path is not accepted by the API"),
        ({"spec": {}, "colour": "red"}, "colour: unknown field"),
        ({"spec": {"overrides": {"pretrain.epochs": 0}}}, "overrides.pretrain.epochs: Input should be greater"),
        ({"spec": {"overrides": {"pretrain.inco.views": 0}}}, "overrides.pretrain.inco.views"),
        ({"spec": {"resources": {"workers": 1000000}}}, "spec.resources.workers"),
        ({"kind": "finetune", "spec": {}}, "a finetune job needs pretrained_job"),
        ({"kind": "pretrain", "spec": {"method": "supervised"}}, "method 'supervised' has no pretraining"),
        ({"kind": "banana", "spec": {}}, "kind: "),
        ({"kind": "tune", "spec": {"ratios": ["1:16", "1:8"]}}, "a tune job searches for one ratio"),
        ({"kind": "tune", "spec": {"seeds": [0, 1]}}, "a tune job uses one seed"),
        ({"kind": "tune", "spec": {"method": "supervised"}}, "has no pretraining to tune"),
        ({"kind": "tune", "spec": {"method": "simclr"}}, "a_f, t1, t2, views are InCo's parameters"),
        ({"kind": "tune", "spec": {}, "tune": {"trials": 0}}, "tune.trials: Input should be greater than or equal"),
        ({"kind": "tune", "spec": {}, "tune": {"params": ["tau"]}}, "tune.params.0: must be one of"),
        ({"kind": "tune", "spec": {}, "tune": {"params": ["lr", "lr"]}}, "list has repeated entries"),
        ({"kind": "tune", "spec": {}, "tune": {"val_fraction": 1.0}}, "tune.val_fraction"),
        (
            {"kind": "tune", "spec": {"preset": "smoke"}, "tune": {"grace_epochs": 5}},
            "but the pretraining has 1 epochs",
        ),
        ({"spec": {}, "tune": {"trials": 4}}, "tune settings are only for kind 'tune'"),
        ({"kind": "pretrain", "spec": {}, "from_tune": "abc"}, "from_tune is only for kind 'experiment'"),
        ({"spec": {}, "from_tune": "abc"}, "from_tune: no job 'abc' in your team"),
        ({}, "spec: field required"),
    ],
)
def test_validation_errors_name_the_field_and_the_fix(
    client: TestClient, tokens: dict[str, str], body: dict, message: str
) -> None:
    r = client.post("/v1/jobs", json=body, headers=auth(tokens["alpha"]))
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert client.get("/v1/jobs", headers=auth(tokens["alpha"])).json() == []  # nothing stored


def test_malformed_json_is_a_422(client: TestClient, tokens: dict[str, str]) -> None:
    r = client.post(
        "/v1/jobs", content=b"{not json", headers={**auth(tokens["alpha"]), "content-type": "application/json"}
    )
    assert r.status_code == 422 and "JSON" in r.json()["detail"]


def test_finetune_after_a_pretrain_job_is_a_dependency(client: TestClient, tokens: dict[str, str]) -> None:
    h = auth(tokens["alpha"])
    pre = _submit(client, tokens["alpha"], {"kind": "pretrain", **SMOKE})
    ft = _submit(client, tokens["alpha"], {"kind": "finetune", "pretrained_job": pre["id"], **SMOKE})
    assert ft["pretrained_job"] == pre["id"]
    exp = _submit(client, tokens["alpha"])
    r = client.post("/v1/jobs", json={"kind": "finetune", "pretrained_job": exp["id"], **SMOKE}, headers=h)
    assert r.status_code == 422 and "not a pretrain job" in r.json()["detail"]
    r = client.post(
        "/v1/jobs",
        json={"kind": "finetune", "pretrained_job": pre["id"], "spec": {"method": "simclr", "preset": "smoke"}},
        headers=h,
    )
    assert r.status_code == 422 and "pretrained 'inco'" in r.json()["detail"]
    assert client.post(f"/v1/jobs/{pre['id']}/cancel", headers=h).json()["status"] == "canceled"
    assert client.get(f"/v1/jobs/{ft['id']}", headers=h).json()["status"] == "canceled"  # its follower too


def test_datasets_must_stay_under_the_data_root(
    client: TestClient, tokens: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    h = auth(tokens["alpha"])
    r = client.post("/v1/datasets", json={"name": "default", "path": "neu-cls"}, headers=h)
    assert r.status_code == 409 and "exists already" in r.json()["detail"]
    for path in ("../", "/etc", "neu-cls/../../"):
        r = client.post("/v1/datasets", json={"name": "x", "path": path}, headers=h)
        assert r.status_code == 422 and "outside the server's data root" in r.json()["detail"], path
    r = client.post("/v1/datasets", json={"name": "x", "path": "missing-folder"}, headers=h)
    assert r.status_code == 422 and "does not exist" in r.json()["detail"]
    r = client.post("/v1/datasets", json={"name": "../x", "path": "neu-cls"}, headers=h)
    assert r.status_code == 422 and r.json()["detail"].startswith("name:")
    listed = client.get("/v1/datasets", headers=h).json()
    assert [(d["name"], d["images"], len(d["classes"])) for d in listed] == [("default", 1800, 6)]


def test_a_symlink_out_of_the_data_root_is_refused(
    client: TestClient, tokens: dict[str, str], tmp_path: Path, neu_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(neu_path, root / "link-out")
    client.app.state.settings = client.app.state.settings.model_copy(update={"data_root": root})
    r = client.post("/v1/datasets", json={"name": "x", "path": "link-out"}, headers=auth(tokens["alpha"]))
    assert r.status_code == 422 and "outside the server's data root" in r.json()["detail"]


def test_results_filters_are_validated(client: TestClient, tokens: dict[str, str]) -> None:
    h = auth(tokens["alpha"])
    assert client.get("/v1/results?ratio=1:16&method=inco&eval=linear&preset=smoke", headers=h).json() == []
    r = client.get("/v1/results?ratio=16", headers=h)
    assert r.status_code == 422 and r.json()["detail"] == "ratio: ratio must look like 1:16 (got '16')"
    r = client.get("/v1/results?method=byol", headers=h)
    assert r.status_code == 422 and "unknown method 'byol'" in r.json()["detail"]


def test_redis_down_means_503_and_nothing_stored(settings: Settings, tokens: dict[str, str], client) -> None:
    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down)) as c:
        r = c.post("/v1/jobs", json=SMOKE, headers=auth(tokens["alpha"]))
        assert r.status_code == 503 and "Redis unreachable" in r.json()["detail"]
        assert c.get("/v1/jobs", headers=auth(tokens["alpha"])).json() == []
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["database"] == "ok" and "Redis unreachable" in r.json()["redis"]


def test_openapi_describes_every_route_and_model(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/metrics",
        "/v1/jobs/{job_id}/logs",
        "/v1/jobs/{job_id}/results",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/trials",
        "/v1/results",
        "/v1/datasets",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    for model in (
        "JobCreate",
        "JobPublic",
        "RunSpec",
        "LeaderboardRow",
        "DatasetCreate",
        "MetricPublic",
        "TuneSettings",
        "TrialPublic",
    ):
        assert model in doc["components"]["schemas"], model
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


def test_tune_jobs_list_their_trials_best_first_to_their_team_only(client: TestClient, tokens: dict[str, str]) -> None:
    job = _submit(client, tokens["alpha"], {"kind": "tune", "spec": {"preset": "smoke"}, "tune": {"trials": 5}})
    assert (
        job["kind"] == "tune"
        and job["tune"]["trials"] == 5
        and job["tune"]["params"]
        == [
            "t1",
            "t2",
            "a_f",
            "views",
            "lr",
        ]
    )
    rows = [
        (1, "stopped", 0.9, 1),
        (2, "completed", 0.5, 4),
        (3, "failed", None, 0),
        (4, "completed", 0.7, 4),
        (5, "running", 0.8, 2),
    ]
    with session_scope(client.app.state.engine) as s:
        for number, status, score, epoch in rows:
            access.save_trial(
                s,
                job_id=job["id"],
                number=number,
                trial_id=f"t{number}",
                params={"pretrain.inco.views": number + 1},
                epochs=4,
                status=status,
                score=score,
                epoch=epoch,
                error="boom" if status == "failed" else None,
            )
    r = client.get(f"/v1/jobs/{job['id']}/trials", headers=auth(tokens["alpha"]))
    assert r.status_code == 200, r.text
    assert [t["number"] for t in r.json()] == [4, 2, 1, 5, 3]
    assert r.json()[-1]["error"] == "boom" and r.json()[0]["params"] == {"pretrain.inco.views": 5}
    r = client.get(f"/v1/jobs/{job['id']}/trials", headers=auth(tokens["beta"]))
    assert r.status_code == 404
    # an experiment from a tune job that has not finished is refused, and nothing is stored
    r = client.post("/v1/jobs", json={"from_tune": job["id"], "spec": {}}, headers=auth(tokens["alpha"]))
    assert r.status_code == 409 and f"inco wait {job['id']}" in r.json()["detail"]
    r = client.post("/v1/jobs", json={"from_tune": job["id"], "spec": {}}, headers=auth(tokens["beta"]))
    assert r.status_code == 422 and "no job" in r.json()["detail"]
    assert len(client.get("/v1/jobs", headers=auth(tokens["alpha"])).json()) == 1


def test_from_tune_takes_the_best_completed_trial(client: TestClient, tokens: dict[str, str]) -> None:
    tune = _submit(
        client,
        tokens["alpha"],
        {
            "kind": "tune",
            "spec": {"preset": "smoke", "overrides": {"pretrain.epochs": 3}, "resources": {"device": "cpu"}},
        },
    )
    with session_scope(client.app.state.engine) as s:
        for number, score in ((1, 0.4), (2, 0.6)):
            access.save_trial(
                s,
                job_id=tune["id"],
                number=number,
                trial_id=f"t{number}",
                params={"pretrain.inco.views": 2 + number, "pretrain.optim.lr": 0.01 * number},
                epochs=3,
                status="completed",
                score=score,
                epoch=3,
            )
        access.finish_job(s, job_id=tune["id"], status="succeeded")
    body = {"from_tune": tune["id"], "spec": {"ratios": ["1:8"], "overrides": {"pretrain.optim.lr": 0.05}}}
    job = _submit(client, tokens["alpha"], body)
    assert job["kind"] == "experiment" and job["spec"]["preset"] == "smoke" and job["spec"]["ratios"] == ["1:8"]
    assert job["spec"]["resources"]["device"] == "cpu"
    assert job["spec"]["overrides"] == {
        "pretrain.epochs": 3,
        "pretrain.inco.views": 4,
        "pretrain.optim.lr": 0.05,  # the request's own overrides win
    }
    assert job["outputs"]["from_tune"] == {
        "job": tune["id"],
        "trial": 2,
        "score": 0.6,
        "params": {"pretrain.inco.views": 4, "pretrain.optim.lr": 0.02},
    }
    r = client.post("/v1/jobs", json={**body, "spec": {"method": "simclr"}}, headers=auth(tokens["alpha"]))
    assert r.status_code == 422 and "tuned 'inco', not 'simclr'" in r.json()["detail"]
