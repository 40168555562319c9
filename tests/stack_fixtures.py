"""One local stack for the tests that need the whole service: ``inco up`` (the API, one worker, a local
Ray) in a home of its own, shared by tests/cli/test_stack_e2e.py and tests/web/test_browser.py.

The two files are one lane of tests/conftest.py, so one test process runs them one after the other and
the stack starts once (a start costs about 20 s, and each stack trains its own smoke job). It stops
right after the last test that uses it, not at the end of the session (an idle Ray head and worker
would take CPU from the tests that follow): ``inco down``, then the checks that ``down`` stopped every
process it started, removed stack.json and finds nothing to stop the second time. A failed check is an
error in the teardown of that last test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from cli.stack import _alive
from worker.main import free_port

REPO = Path(__file__).resolve().parents[1]
REDIS_E2E = os.environ.get("INCO_TEST_REDIS_E2E", "redis://127.0.0.1:6379/10")
FIXTURE = "local_stack"


@dataclass
class LocalStack:
    """A stack ``inco up`` started: its home, port and environment, ``up``'s answer and stack.json."""

    home: Path
    port: int
    env: dict[str, str]
    up: subprocess.CompletedProcess[str] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        """The local team's token (every scope), as ``inco up`` keeps it in INCO_HOME/token."""
        return (self.home / "token").read_text().strip()

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.home / 'inco.db'}"

    def inco(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``inco ARGS`` against this stack (its INCO_HOME and Redis)."""
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        """``inco down`` and its checks; once (later calls do nothing)."""
        if self.stopped:
            return
        self.stopped = True
        down = self.inco("down", timeout=120)
        assert down.returncode == 0, down.stderr
        assert not (self.home / "stack.json").exists()
        assert not any(_alive(pid) for pid in self.state.get("pids", {}).values())
        assert "nothing to stop" in self.inco("down").stderr


_running: list[LocalStack] = []
_stopped_early: list[LocalStack] = []


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory, neu_path: Path) -> Iterator[LocalStack]:
    """``inco up`` on a free port, Redis database 10 (flushed) and NEU-CLS as data set ``default``."""
    Redis.from_url(REDIS_E2E).flushdb()
    home = tmp_path_factory.mktemp("local-stack") / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INCO_", "RAY_"))}
    env.update(INCO_HOME=str(home), INCO_REDIS_URL=REDIS_E2E, INCO_DATA=str(neu_path), COLUMNS="200")
    stack = LocalStack(home=home, port=free_port(), env=env)
    _running.append(stack)
    try:
        stack.up = stack.inco("up", "--port", str(stack.port))
        if (home / "stack.json").exists():
            stack.state = json.loads((home / "stack.json").read_text())
        if stack.up.returncode != 0:
            pytest.fail(f"inco up failed (exit {stack.up.returncode}): {stack.up.stderr[-3000:]}")
        yield stack
    finally:
        if stack in _running:
            _running.remove(stack)
        stack.stop()


def _uses_stack(item: pytest.Item | None) -> bool:
    return item is not None and FIXTURE in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the stack once the next test does not use it (or there is none)."""
    if _running and _uses_stack(item) and not _uses_stack(nextitem):
        stack = _running.pop()
        _stopped_early.append(stack)
        stack.stop()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _stopped_early and _uses_stack(item):
        pytest.fail(
            "the local stack stopped after the last test that used it before this one: its tests must run one "
            "after another (one lane of tests/conftest.py, sorted together)"
        )
