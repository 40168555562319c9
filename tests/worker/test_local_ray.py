"""A worker's own Ray head: up when start_local_ray returns, started again when it died, with the Ray
dashboard only when asked, and a job whose Ray head is gone fails its attempt at once instead of
waiting for it forever; what a dead Train controller held is freed."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from ray import __version__ as ray_version

from cli.stack import descendants
from server.errors import ServiceUnavailable
from tests.chaos import pids_running
from tests.worker.conftest import REPO
from worker.jobs import check_ray_answers
from worker.main import LocalRay, start_local_ray

pytestmark = [pytest.mark.integration]


def _answers(address: str) -> bool:
    host, port = address.split(":")
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) == 0


def _dashboard_modules(head: subprocess.Popen[bytes]) -> list[int]:
    """The processes of a head's dashboard modules (without the dashboard, Ray's API server still runs,
    with its usage-stats module only, and serves no HTTP)."""
    return sorted(set(pids_running("ray-dashboard-")) & set(descendants(head.pid)))


def test_a_dead_local_head_is_started_again_before_the_next_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """...and a head runs the Ray dashboard only when asked (INCO_RAY_DASHBOARD), on loopback at the
    port its log line names."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray = LocalRay(tmp_path, nice=0)
    ray.start()
    try:
        first, proc = os.environ["RAY_ADDRESS"], ray.proc
        assert proc is not None and _answers(first)
        assert b"Ray runtime started." in (tmp_path / "logs" / f"ray-{first.split(':')[1]}.log").read_bytes()
        # its processes know their cluster: Ray's own lookups would otherwise take the newest Ray head on
        # the machine, another one in these tests
        assert f"RAY_ADDRESS={first}\0".encode() in Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert _dashboard_modules(proc) == []  # not asked for one
        ray.ensure()  # alive: nothing happens
        assert ray.proc is proc
        os.killpg(proc.pid, signal.SIGKILL)  # the head and its GCS, raylet, dashboard: gone at once
        proc.wait(10)
        ray.dashboard = True
        with caplog.at_level(logging.INFO, logger="inco.worker"):
            ray.ensure()
        assert ray.proc is not proc and ray.proc.poll() is None
        assert os.environ["RAY_ADDRESS"] != first and _answers(os.environ["RAY_ADDRESS"])
        assert f"the local Ray head (pid {proc.pid}) exited" in caplog.text
        url = re.search(r"the Ray dashboard of \S+: (http://127\.0\.0\.1:\d+)", caplog.text)
        assert url and _dashboard_modules(ray.proc), caplog.text
        token = os.environ["RAY_AUTH_TOKEN"]  # the head's token guards its dashboard too
        assert httpx.get(url[1] + "/api/version", timeout=30).status_code == 401
        r = httpx.get(url[1] + "/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200 and r.json()["ray_version"] == ray_version, r.text
    finally:
        ray.stop()
    assert ray.proc.poll() is not None


ORPHANS = """
import time, ray
from ray.util.placement_group import placement_group, placement_group_table
from worker.placement import free_orphaned_placement_groups

@ray.remote(num_cpus=0)
class Controller:
    def reserve(self):
        group = placement_group([{"CPU": 0.5}])
        ray.get(group.ready())
        return group.id.hex()

ray.init(logging_level="ERROR", log_to_driver=False)
own = placement_group([{"CPU": 0.5}])
ray.get(own.ready())
live, dead = Controller.remote(), Controller.remote()
kept, orphan = ray.get([live.reserve.remote(), dead.reserve.remote()])
assert free_orphaned_placement_groups() == 0, "freed with every creator alive"
ray.kill(dead)
deadline = time.monotonic() + 30
while (freed := free_orphaned_placement_groups()) == 0:
    assert time.monotonic() < deadline, "the dead actor's placement group was never freed"
    time.sleep(0.2)
states = {pg_id: info["state"] for pg_id, info in placement_group_table().items()}
print(freed, states[orphan], states[kept], states[own.id.hex()], free_orphaned_placement_groups())
"""


def test_only_placement_groups_whose_creator_actor_died_are_freed(local_ray: dict[str, str]) -> None:
    """What a search's driver frees every few seconds (a DDP trial's Train controller that ended with
    its trial leaves its workers' placement group): a placement group made by an actor that died, but
    neither one whose actor lives nor the driver's own, and none twice. (A driver of its own, as a
    search's work horse is.)"""
    done = subprocess.run(
        [sys.executable, "-c", ORPHANS],
        cwd=REPO,
        env={**os.environ, **local_ray},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["1", "REMOVED", "CREATED", "CREATED", "0"], done.stdout


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
