"""End to end through the CLI against a stack that `inco up` starts: submit, wait, results, down.

The stack is tests/stack_fixtures.py's ``local_stack``, which tests/web/test_browser.py uses next; its
teardown runs `inco down` and checks that every process it started is gone, stack.json is removed and
a second `down` finds nothing to stop."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.stack_fixtures import LocalStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_up_submit_wait_results(local_stack: LocalStack) -> None:
    stack = local_stack
    assert stack.up is not None and stack.up.returncode == 0, stack.up
    state = json.loads((stack.home / "stack.json").read_text())
    assert state["api_url"] == stack.api_url and set(state["pids"]) >= {"api", "worker", "ray"}
    assert httpx.get(f"{state['api_url']}/v1/jobs").status_code == 401  # no token, no entry

    done = stack.inco("submit", "--ratio", "1:16", "--preset", "smoke", "--wait")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "succeeded" in done.stderr and "1:16" in done.stdout

    results = stack.inco("results", "--format", "json")
    assert results.returncode == 0, results.stderr
    rows = json.loads(results.stdout)
    assert [(r["variant"], r["ratio"], r["preset"], r["count"]) for r in rows] == [
        ("InCo with DWV", "1:16", "smoke", 1)
    ]
    assert 0 < rows[0]["mean"] <= 1
    again = stack.inco("up", "--port", str(stack.port))
    assert again.returncode == 0 and "running already" in again.stdout
