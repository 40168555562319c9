"""A worker's own Ray head: up when start_local_ray returns, started again when it died, and a job
whose Ray head is gone fails its attempt at once instead of waiting for it forever."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from server.errors import ServiceUnavailable
from tests.chaos import pids_running
from worker.jobs import check_ray_answers
from worker.main import LocalRay, start_local_ray

pytestmark = [pytest.mark.integration]


def _answers(address: str) -> bool:
    host, port = address.split(":")
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) == 0


def test_a_dead_local_head_is_started_again_before_the_next_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray = LocalRay(tmp_path, nice=0)
    ray.start()
    try:
        first, proc = os.environ["RAY_ADDRESS"], ray.proc
        assert proc is not None and _answers(first)
        assert b"Ray runtime started." in (tmp_path / "logs" / f"ray-{first.split(':')[1]}.log").read_bytes()
        # its processes know their cluster: Ray's own lookups (the state API of Train's placement-group
        # cleaner) would otherwise take the newest Ray head on the machine, another one in these tests
        assert f"RAY_ADDRESS={first}\0".encode() in Path(f"/proc/{proc.pid}/environ").read_bytes()
        ray.ensure()  # alive: nothing happens
        assert ray.proc is proc
        os.killpg(proc.pid, signal.SIGKILL)  # the head and its GCS, raylet, dashboard: gone at once
        proc.wait(10)
        with caplog.at_level(logging.ERROR, logger="inco.worker"):
            ray.ensure()
        assert ray.proc is not proc and ray.proc.poll() is None
        assert os.environ["RAY_ADDRESS"] != first and _answers(os.environ["RAY_ADDRESS"])
        assert f"the local Ray head (pid {proc.pid}) exited" in caplog.text
    finally:
        ray.stop()
    assert ray.proc.poll() is not None


def test_a_head_that_does_not_come_up_in_time_is_tried_again_then_an_error_and_leaves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="inco.worker"),
        pytest.raises(ServiceUnavailable, match="did not start within 1 s"),
    ):
        start_local_ray(tmp_path, timeout_s=1, tries=2)
    assert time.monotonic() - started < 60
    assert "the local Ray head did not start" in caplog.text and "trying again" in caplog.text
    # two heads tried, nothing of either is left: no process (each log names its port), nothing on the port
    ports = [log.stem.split("-")[1] for log in (tmp_path / "logs").glob("ray-*.log")]
    assert len(ports) == 2
    for port in ports:
        assert pids_running(f"--port={port}") == []
        assert not _answers(f"127.0.0.1:{port}")


def test_a_ray_address_that_does_not_answer_fails_the_attempt_quickly() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"the Ray head at 127.0.0.1:{port} does not answer"):
        check_ray_answers(f"127.0.0.1:{port}", timeout_s=1)
    assert time.monotonic() - started < 10
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        check_ray_answers(f"127.0.0.1:{listener.getsockname()[1]}")  # answers: no error
    check_ray_answers("auto")  # left to Ray
    check_ray_answers(None)
