"""Submitting safely: the same request with the same Idempotency-Key makes one job, and a team's
limits on queued + running jobs and GPUs answer 429 without storing or queueing anything."""

from __future__ import annotations

import threading
from collections.abc import Iterator

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
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"max_active_jobs": 3, "max_gpus": 2}))) as c:
        yield c


@pytest.fixture
def token(client: TestClient) -> str:
    return team_with_dataset(client)


def _queued(redis: Redis, settings: Settings) -> int:
    return Queue(settings.queue, connection=redis).count


def _jobs(client: TestClient, token: str) -> list[dict]:
    return client.get("/v1/jobs", headers=auth(token)).json()


def test_the_same_key_and_request_make_one_job(client: TestClient, token: str, redis_db: Redis, settings) -> None:
    headers = {**auth(token), "Idempotency-Key": "order-7f3a"}
    first = client.post("/v1/jobs", json=SMOKE, headers=headers)
    again = client.post("/v1/jobs", json=SMOKE, headers=headers)
    assert first.status_code == 201 and again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert len(_jobs(client, token)) == 1 and _queued(redis_db, settings) == 1
    # without a key, or with another key, a second job is made
    assert client.post("/v1/jobs", json=SMOKE, headers=auth(token)).status_code == 201
    assert client.post("/v1/jobs", json=SMOKE, headers={**auth(token), "Idempotency-Key": "other"}).status_code == 201
    assert len(_jobs(client, token)) == 3 and _queued(redis_db, settings) == 3


def test_a_key_reused_for_another_request_is_a_409(client: TestClient, token: str, redis_db: Redis, settings) -> None:
    headers = {**auth(token), "Idempotency-Key": "k1"}
    assert client.post("/v1/jobs", json=SMOKE, headers=headers).status_code == 201
    other = {"spec": {**SMOKE["spec"], "seeds": [1]}}
    r = client.post("/v1/jobs", json=other, headers=headers)
    assert r.status_code == 409 and "different request" in r.json()["detail"]
    assert len(_jobs(client, token)) == 1 and _queued(redis_db, settings) == 1


def test_keys_belong_to_a_team(client: TestClient, token: str) -> None:
    beta = team_with_dataset(client, "beta")
    a = client.post("/v1/jobs", json=SMOKE, headers={**auth(token), "Idempotency-Key": "shared"})
    b = client.post("/v1/jobs", json=SMOKE, headers={**auth(beta), "Idempotency-Key": "shared"})
    assert a.status_code == b.status_code == 201 and a.json()["id"] != b.json()["id"]


@pytest.mark.parametrize("key", ["", "has space", "x" * 129, "tab\there"])
def test_a_malformed_key_is_a_422(client: TestClient, token: str, key: str) -> None:
    r = client.post("/v1/jobs", json=SMOKE, headers={**auth(token), "Idempotency-Key": key})
    assert r.status_code == 422 and "idempotency-key" in r.json()["detail"].lower(), r.text
    assert _jobs(client, token) == []


def test_concurrent_retries_with_one_key_make_one_job(
    client: TestClient, token: str, redis_db: Redis, settings
) -> None:
    headers = {**auth(token), "Idempotency-Key": "burst"}
    codes: list[int] = []
    ids: set[str] = set()

    def send() -> None:
        r = client.post("/v1/jobs", json=SMOKE, headers=headers)
        codes.append(r.status_code)
        if r.is_success:
            ids.add(r.json()["id"])

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes).count(201) == 1 and set(codes) <= {200, 201}, codes
    assert len(ids) == 1 and len(_jobs(client, token)) == 1 and _queued(redis_db, settings) == 1


def test_the_active_job_limit_answers_429_until_a_job_ends(
    client: TestClient, token: str, redis_db: Redis, settings
) -> None:
    ids = [client.post("/v1/jobs", json=SMOKE, headers=auth(token)).json()["id"] for _ in range(3)]
    r = client.post("/v1/jobs", json=SMOKE, headers=auth(token))
    assert r.status_code == 429 and r.headers["Retry-After"]
    assert "3 queued or running jobs, its limit is 3" in r.json()["detail"]
    assert len(_jobs(client, token)) == 3 and _queued(redis_db, settings) == 3
    assert client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(token)).status_code == 200
    assert client.post("/v1/jobs", json=SMOKE, headers=auth(token)).status_code == 201


def test_a_team_limit_overrides_the_server_default(client: TestClient, token: str) -> None:
    with session_scope(client.app.state.engine) as s:
        team = access.ensure_team(s, name="alpha")
        team.max_active_jobs = 1
        s.add(team)
    assert client.post("/v1/jobs", json=SMOKE, headers=auth(token)).status_code == 201
    assert client.post("/v1/jobs", json=SMOKE, headers=auth(token)).status_code == 429


def test_gpu_limits(client: TestClient, token: str, redis_db: Redis, settings) -> None:
    def gpu_job(workers: int) -> dict:
        return {"spec": {**SMOKE["spec"], "resources": {"device": "cuda", "workers": workers}}}

    r = client.post("/v1/jobs", json=gpu_job(3), headers=auth(token))  # can never fit the team's 2
    assert r.status_code == 422 and "needs 3 GPU(s)" in r.json()["detail"]
    first = client.post("/v1/jobs", json=gpu_job(2), headers=auth(token))
    assert first.status_code == 201 and first.json()["id"]
    r = client.post("/v1/jobs", json=gpu_job(1), headers=auth(token))
    assert r.status_code == 429 and "holds 2 of its 2 GPU(s)" in r.json()["detail"]
    assert client.post("/v1/jobs", json=SMOKE, headers=auth(token)).status_code == 201  # CPU jobs still go
    assert len(_jobs(client, token)) == 2 and _queued(redis_db, settings) == 2
