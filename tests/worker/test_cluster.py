"""A Ray cluster of two nodes started by the test (a head and a second node on loopback, one CPU
each, token authentication on): a 2-worker job submitted through the API runs DDP across both."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from server.api.app import create_app
from server.settings import Settings
from tests.service_fixtures import auth, make_team
from tests.worker.conftest import REPO, SMOKE
from worker.main import ray_env, start_local_ray, stop_local_ray

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REDIS_CLUSTER = "redis://127.0.0.1:6379/7"


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[dict[str, str]]:
    head, address = start_local_ray(tmp_path, num_cpus=1)
    env = {**os.environ, **ray_env(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    with open(tmp_path / "node.log", "wb") as log:
        node = subprocess.Popen(
            [
                ray_bin,
                "start",
                "--block",
                f"--address={address}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cluster = {**ray_env(tmp_path), "RAY_ADDRESS": address}
    probe = "import ray; ray.init(logging_level='ERROR'); print(len([n for n in ray.nodes() if n['Alive']]))"
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(
            [sys.executable, "-c", probe], env={**os.environ, **cluster}, capture_output=True, text=True, timeout=60
        )
        if out.stdout.strip() == "2":
            break
        assert time.monotonic() < deadline, f"the second node did not join: {out.stderr[-2000:]}"
        time.sleep(1)
    yield cluster
    stop_local_ray(node)  # a joined node stops the same way as the head
    stop_local_ray(head)


def test_a_two_worker_job_runs_across_two_nodes(
    two_node_cluster: dict[str, str], neu_path: Path, tmp_path: Path
) -> None:
    Redis.from_url(REDIS_CLUSTER).flushdb()
    settings = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'inco.db'}",
        redis_url=REDIS_CLUSTER,
        data_root=neu_path.parent,
        queue=f"inco-cl-{secrets.token_hex(3)}",
    )
    with TestClient(create_app(settings)) as client:
        h = auth(make_team(client.app.state.engine, "alpha"))
        assert (
            client.post("/v1/datasets", json={"name": "default", "path": neu_path.name}, headers=h).status_code == 201
        )
        spec = {
            **SMOKE["spec"],
            "method": "inco",
            "resources": {"device": "cpu", "workers": 2},
            "overrides": {"pretrain.max_images": 127},
        }
        job_id = client.post("/v1/jobs", json={"spec": spec}, headers=h).json()["id"]
        env = {
            **os.environ,
            **two_node_cluster,
            "INCO_HOME": str(settings.home),
            "INCO_DATABASE_URL": settings.db_url,
            "INCO_REDIS_URL": REDIS_CLUSTER,
            "INCO_QUEUE": settings.queue,
            "INCO_CPUS_PER_WORKER": "1",
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
        logs = [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs", headers=h).json()]
        assert "training on 2 workers of 1 CPU(s) each" in logs  # 1 CPU per node: one worker on each
        assert job["results"] == 1
