"""The training side's CPU priority (``worker.priority``, INCO_WORKER_NICE): the process nice and, on
a kernel with session autogroups, the session group's nice, inherited by what it execs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import Settings

AUTOGROUPS = Path("/proc/sys/kernel/sched_autogroup_enabled")


def _niced(nice: int, *, start_at: int = 0, new_session: bool = True) -> tuple[int, str]:
    """Run ``python -m worker.priority NICE sh -c ...`` (optionally already at ``start_at``) and read
    the nice and the autogroup line of the shell it execs."""
    cmd = [sys.executable, "-m", "worker.priority", str(nice), "sh", "-c", "ps -o ni= -p $$; cat /proc/self/autogroup"]
    if start_at:
        cmd = ["nice", "-n", str(start_at), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, start_new_session=new_session).stdout
    ni, _, group = out.partition("\n")
    return int(ni), group.strip()


def test_a_session_leader_lowers_its_nice_and_its_session_groups() -> None:
    ni, group = _niced(10)
    assert ni == 10
    if AUTOGROUPS.exists() and AUTOGROUPS.read_text().strip() == "1":
        assert group.endswith("nice 10"), group  # the scheduler weighs the whole session by it


def test_a_process_in_a_shared_session_leaves_the_sessions_group_alone() -> None:
    """Not a session leader (its session holds other processes, e.g. a shell's): only its own nice."""
    before = Path("/proc/self/autogroup").read_text().strip() if Path("/proc/self/autogroup").exists() else ""
    ni, group = _niced(7, new_session=False)
    assert ni == 7 and group == before


def test_a_priority_is_never_raised() -> None:
    ni, _ = _niced(5, start_at=12)
    assert ni == 12


def test_bad_command_lines_are_refused() -> None:
    for argv in ([], ["ten", "true"], ["10"]):
        done = subprocess.run([sys.executable, "-m", "worker.priority", *argv], capture_output=True, text=True)
        assert done.returncode != 0 and "usage: python -m worker.priority NICE COMMAND" in done.stderr


@pytest.mark.parametrize("value", [-1, 20])
def test_worker_nice_is_bounded(value: int) -> None:
    with pytest.raises(ValidationError, match="worker_nice"):
        Settings(worker_nice=value)


def test_worker_nice_defaults_to_ten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INCO_WORKER_NICE", raising=False)
    assert Settings().worker_nice == 10
    monkeypatch.setenv("INCO_WORKER_NICE", "0")
    assert Settings().worker_nice == 0
