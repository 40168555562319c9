"""The worker against PostgreSQL: `inco worker --burst` runs a queued smoke job to the end."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from server.api.app import create_app
from server.settings import Settings
from tests.service_fixtures import _empty, auth, make_team
from tests.worker.conftest import REPO, SMOKE

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REDIS_PG = "redis://127.0.0.1:6379/8"


def test_a_smoke_job_on_postgresql(pg_url: str, local_ray: dict[str, str], neu_path: Path, tmp_path: Path) -> None:
    _empty(pg_url)
    Redis.from_url(REDIS_PG).flushdb()
    settings = Settings(
        home=tmp_path,
        database_url=pg_url,
        redis_url=REDIS_PG,
        data_root=neu_path.parent,
        queue=f"inco-pg-{secrets.token_hex(3)}",
    )
    with TestClient(create_app(settings)) as client:
        token = make_team(client.app.state.engine, "alpha")
        h = auth(token)
        assert (
            client.post("/v1/datasets", json={"name": "default", "path": neu_path.name}, headers=h).status_code == 201
        )
        job_id = client.post("/v1/jobs", json=SMOKE, headers=h).json()["id"]
        env = {
            **os.environ,
            **local_ray,
            "INCO_HOME": str(tmp_path),
            "INCO_DATABASE_URL": pg_url,
            "INCO_REDIS_URL": REDIS_PG,
            "INCO_QUEUE": settings.queue,
            "INCO_CPUS_PER_WORKER": "2",
        }
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "worker", "--burst"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        job = client.get(f"/v1/jobs/{job_id}", headers=h).json()
        assert job["status"] == "succeeded", job["error"]
        assert job["results"] == 1
        assert next(m["stage"] for m in client.get(f"/v1/jobs/{job_id}/metrics", headers=h).json()) == "pretrain"
        board = client.get("/v1/results", headers=h).json()
        assert len(board) == 1 and 0 <= board[0]["mean"] <= 1
