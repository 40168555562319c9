"""`inco worker` stops when asked: SIGTERM (what `inco down`, docker and Kubernetes send) or SIGINT ends
an idle worker in seconds with exit code 0: while it serves (RQ's warm shutdown used to be taken for a
lost Redis, and the worker served again until its supervisor's SIGKILL), at the moment RQ starts (before
RQ's own handlers are in place the default ended the process and left RQ's scheduler process behind),
and while it waits for its store."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis import Redis

from cli.stack import process_table
from server.settings import Settings
from tests.worker.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("sig", "when"),
    [
        (signal.SIGTERM, "Listening on"),  # the moment RQ starts: its scheduler forked, no RQ handler yet
        (signal.SIGINT, "Listening on"),
        (signal.SIGTERM, "cleaning registries"),  # serving
        (signal.SIGTERM, "waiting for the store"),  # an empty database: nothing migrated it
    ],
)
def test_an_idle_worker_stops_at_once_when_asked(
    sig: signal.Signals, when: str, engine, settings: Settings, redis_db: Redis, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'empty.db'}" if when == "waiting for the store" else settings.db_url
    env = {
        **os.environ,
        "INCO_HOME": str(tmp_path),
        "INCO_DATABASE_URL": db_url,
        "INCO_REDIS_URL": settings.redis_url,
        "INCO_QUEUE": f"inco-stop-{secrets.token_hex(3)}",
        "RAY_ADDRESS": "127.0.0.1:1",  # never reached: the worker connects to Ray only for a job
        "INCO_LOG_FORMAT": "text",
    }
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while when not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.02)
        children = [
            child for child, fields in process_table().items() if int(fields[1]) == proc.pid
        ]  # RQ's scheduler process, once RQ started
        asked = time.monotonic()
        proc.send_signal(sig)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, log.read_text()[-3000:]
        assert time.monotonic() - asked < 15  # RQ's scheduler may take 5 s to be killed (see InCoWorker.stop_scheduler)
        assert len(re.findall(r"Worker \S+: started with PID", log.read_text())) <= 1  # it did not serve again
        time.sleep(0.5)
        assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == []  # nothing left behind
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
