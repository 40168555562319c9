"""End to end through the CLI against a stack that `inco up` starts: submit, wait, results, down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from redis import Redis

from cli.stack import _alive
from worker.main import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
REDIS_E2E = os.environ.get("INCO_TEST_REDIS_E2E", "redis://127.0.0.1:6379/10")


def test_up_submit_wait_results_down(tmp_path: Path, neu_path: Path) -> None:
    Redis.from_url(REDIS_E2E).flushdb()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INCO_", "RAY_"))}
    env.update(INCO_HOME=str(tmp_path / "home"), INCO_REDIS_URL=REDIS_E2E, INCO_DATA=str(neu_path), COLUMNS="200")

    def inco(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    up = inco("up", "--port", str(port))
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((tmp_path / "home" / "stack.json").read_text())
        assert state["api_url"] == f"http://127.0.0.1:{port}" and set(state["pids"]) >= {"api", "worker", "ray"}
        assert httpx.get(f"{state['api_url']}/v1/jobs").status_code == 401  # no token, no entry

        done = inco("submit", "--ratio", "1:16", "--preset", "smoke", "--wait")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "succeeded" in done.stderr and "1:16" in done.stdout

        results = inco("results", "--format", "json")
        assert results.returncode == 0, results.stderr
        rows = json.loads(results.stdout)
        assert [(r["variant"], r["ratio"], r["preset"], r["count"]) for r in rows] == [
            ("InCo with DWV", "1:16", "smoke", 1)
        ]
        assert 0 < rows[0]["mean"] <= 1
        again = inco("up", "--port", str(port))
        assert again.returncode == 0 and "running already" in again.stdout
    finally:
        down = inco("down", timeout=120)
    assert down.returncode == 0, down.stderr
    assert not (tmp_path / "home" / "stack.json").exists()
    assert not any(_alive(pid) for pid in state["pids"].values())
    assert "nothing to stop" in inco("down").stderr
