"""`inco down` stops what `inco up` started: a process that ignores SIGTERM is killed, and down returns
only when it and its children are gone."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from cli import stack

IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)"
STUBBORN = f"""
import subprocess, sys
{IGNORE_TERM}
child = subprocess.Popen([sys.executable, "-c", "{IGNORE_TERM}; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stop_kills_a_process_group_that_ignores_sigterm_and_waits_until_it_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(stack.STOP_GRACE_S, "ray", 0.5)
    with subprocess.Popen(
        [sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            assert proc.stdout is not None
            child = int(proc.stdout.readline())
            assert stack._alive(proc.pid) and stack._alive(child)
            started = time.monotonic()
            assert stack._stop({"ray": proc.pid}) == ["ray"]
            assert time.monotonic() - started < 5
            assert not stack._alive(proc.pid) and not stack._alive(child)
        finally:
            proc.kill()


def test_stop_skips_processes_that_are_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert stack._stop({"api": proc.pid, "worker": None}) == []  # type: ignore[dict-item]
