"""`inco admin token create/revoke` and `inco serve` against a real SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.store import access
from server.store.db import make_engine, session_scope
from tests.service_fixtures import REDIS_TEST
from worker.main import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INCO_")}
    return {**env, "INCO_HOME": str(home), "COLUMNS": "200"}


def _inco(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=120
    )


def test_token_create_and_revoke(tmp_path: Path) -> None:
    made = _inco(tmp_path, "admin", "token", "create", "--team", "plant-7", "--name", "line 3")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("inco_") and len(token) > 40
    engine = make_engine(f"sqlite:///{tmp_path / 'inco.db'}")
    with session_scope(engine) as s:
        assert access.team_for_token(s, token=token).name == "plant-7"
    gone = _inco(tmp_path, "admin", "token", "revoke", token[:12])
    assert gone.returncode == 0 and f"revoked {token[:12]}" in gone.stdout
    with session_scope(engine) as s:
        assert access.team_for_token(s, token=token) is None
    again = _inco(tmp_path, "admin", "token", "revoke", token[:12])
    assert again.returncode == 1 and again.stderr.startswith("Error: no active token starts with")
    bad = _inco(tmp_path, "admin", "token", "create", "--team", " ")
    assert bad.returncode == 1 and "Error: --team needs a name" in bad.stderr and "Traceback" not in bad.stderr


def test_serve_answers_health_and_migrates(tmp_path: Path) -> None:
    port = free_port()
    env = {**_env(tmp_path), "INCO_REDIS_URL": REDIS_TEST}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "inco serve did not start"
                time.sleep(0.3)
        assert r.status_code == 200 and r.json()["status"] == "ready"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs").status_code == 401
        assert (tmp_path / "inco.db").exists()
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_store_that_cannot_be_reached_is_one_error_line(tmp_path: Path) -> None:
    env = {**_env(tmp_path), "INCO_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "admin", "token", "create", "--team", "a"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        out.returncode == 1
        and out.stderr.startswith("Error: cannot migrate the store")
        and "Traceback" not in out.stderr
    )
