"""A real service for worker tests: the API in-process (TestClient), an `inco worker` subprocess on
real Redis, SQLite and a local Ray, and the NEU-CLS images registered as data set ``default``."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient
from redis import Redis

from server.api.app import create_app
from server.settings import Settings
from server.store.db import make_engine, migrate
from tests.service_fixtures import auth, make_team
from tests.worker.conftest import REPO


@dataclass
class Service:
    settings: Settings
    client: TestClient
    token: str
    worker_log: Path
    env: dict[str, str]
    worker: subprocess.Popen[bytes] | None = None

    def start_worker(self) -> None:
        with open(self.worker_log, "ab") as out:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "worker"],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop_worker(self) -> None:
        if self.worker is None:
            return
        os.killpg(self.worker.pid, signal.SIGTERM)
        time.sleep(1)
        os.killpg(self.worker.pid, signal.SIGTERM)
        try:
            self.worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait(10)

    @property
    def headers(self) -> dict[str, str]:
        return auth(self.token)

    def submit(self, body: dict) -> str:
        r = self.client.post("/v1/jobs", json=body, headers=self.headers)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/jobs/{job_id}", headers=self.headers).json()

    def get(self, path: str) -> list | dict:
        return self.client.get(path, headers=self.headers).json()

    def wait_for_epochs(self, job_id: str, count: int, timeout_s: float = 120) -> None:
        """Poll until ``count`` epochs of the job are stored (its training is under way)."""
        deadline = time.monotonic() + timeout_s
        while len(self.get(f"/v1/jobs/{job_id}/metrics")) < count:
            assert time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)

    def wait(self, job_id: str, timeout_s: float = 180) -> tuple[dict, list[str]]:
        """Poll until the job ends; returns it and the statuses seen on the way."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if not seen or seen[-1] != job["status"]:
                seen.append(job["status"])
            if job["status"] in ("succeeded", "failed", "canceled"):
                return job, seen
            time.sleep(0.2)
        raise AssertionError(
            f"job {job_id} still {seen[-1]} after {timeout_s} s; worker log:\n" + self.worker_log.read_text()[-3000:]
        )


@contextmanager
def running_service(
    home: Path, neu_path: Path, local_ray: dict[str, str], *, redis_url: str, cpus_per_worker: int = 2
) -> Iterator[Service]:
    """The API and one worker on a fresh SQLite store, Redis db and queue."""
    settings = Settings(
        home=home,
        database_url=f"sqlite:///{home / 'inco.db'}",
        redis_url=redis_url,
        data_root=neu_path.parent,
        queue=f"inco-test-{secrets.token_hex(3)}",
    )
    Redis.from_url(redis_url).flushdb()
    engine = make_engine(settings.db_url)
    migrate(engine)
    token = make_team(engine, "alpha")
    env = {
        **os.environ,
        **local_ray,
        "INCO_HOME": str(home),
        "INCO_DATABASE_URL": settings.db_url,
        "INCO_REDIS_URL": redis_url,
        "INCO_QUEUE": settings.queue,
        "INCO_CPUS_PER_WORKER": str(cpus_per_worker),
    }
    try:
        with TestClient(create_app(settings)) as client:
            svc = Service(settings, client, token, home / "worker.log", env)
            svc.start_worker()
            try:
                r = client.post("/v1/datasets", json={"name": "default", "path": neu_path.name}, headers=svc.headers)
                assert r.status_code == 201, r.text
                yield svc
            finally:
                svc.stop_worker()
    finally:
        engine.dispose()
