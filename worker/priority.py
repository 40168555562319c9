"""CPU priority of the training side: the worker, the Ray head it starts and Ray's training processes.

Training is batch work; on a host it shares with the API (``inco up``, a one-machine install) the
API's answers waited for the CPU behind it (bench/load.py). :func:`lower_priority` sets the process's
``nice`` and, where the kernel groups processes by session (``CONFIG_SCHED_AUTOGROUP``, on by default in
most distributions), the nice of the process's session group too: with autogroups the scheduler
shares the CPU between sessions first, so a process's own nice only orders it against processes of
its own session, and the API, started in a session of its own, was not favoured at all.

``python -m worker.priority NICE COMMAND [ARG ...]`` lowers its priority, then execs ``COMMAND``,
so every process ``COMMAND`` starts inherits it (the local Ray head, :func:`worker.main.start_local_ray`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

AUTOGROUP = Path("/proc/self/autogroup")


def lower_priority(nice: int) -> int:
    """Run at CPU priority ``nice`` at least (0-19; a priority is never raised); the nice it has then.
    A session leader sets its session group's nice as well (see the module's text)."""
    now = os.nice(0)
    if nice > now:
        now = os.nice(nice - now)
    if nice > 0 and os.getsid(0) == os.getpid():  # the group is this session's alone
        # no autogroups in this kernel, or not allowed: the process's own nice still holds
        with contextlib.suppress(OSError):
            AUTOGROUP.write_text(str(nice))
    return now


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        raise SystemExit("usage: python -m worker.priority NICE COMMAND [ARG ...]")
    lower_priority(int(argv[0]))
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
