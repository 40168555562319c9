"""Where a command's CPU goes, by kind of process: Ray Train's actors, Ray heads' own processes, test
processes, `inco worker` and its work horses, ...

Runs the command while it samples /proc every ``--every`` seconds (each process's user + system time,
the last value seen before it exits), then prints CPU-seconds per kind, largest first. A process
that lives shorter than one sample is missed; the total is printed beside /proc/stat's (the whole
machine) so that the share it missed shows.

    .venv/bin/python bench/cpu_by_process.py -- bash .ci/run
    .venv/bin/python bench/cpu_by_process.py --json cpu.json -- .venv/bin/python -m pytest tests/worker/test_tune.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
KINDS = [  # (text in the command line, kind), first match wins
    ("gcs_server", "ray head: gcs_server"),
    ("raylet/raylet", "ray head: raylet"),
    ("dashboard/dashboard.py", "ray head: dashboard"),
    ("ray-dashboard-", "ray head: dashboard modules"),
    ("dashboard/agent.py", "ray head: dashboard agent"),
    ("log_monitor", "ray head: log monitor"),
    ("autoscaler/_private/monitor", "ray head: monitor"),
    ("ray.util.client.server", "ray head: client server"),
    ("multiprocessing.forkserver", "ray head: forkserver"),
    ("bin/ray start", "ray head: ray start"),
    ("xdist", "pytest process"),
    ("exec(eval(sys.stdin", "pytest process"),
    ("pytest", "pytest process"),
    ("cli.main worker", "inco worker and work horses"),
    ("cli.main serve", "inco serve"),
    ("uvicorn", "inco serve"),
    ("cli.main", "inco CLI"),
    ("redis-server", "redis"),
    ("postgres", "postgres"),
    ("pip", "pip"),
    ("ruff", "ruff"),
]


def kind_of(cmdline: str) -> str:
    m = re.match(r"ray::(\w+)", cmdline)
    if m:
        return "ray actor: " + m.group(1)
    for text, kind in KINDS:
        if text in cmdline:
            return kind
    return "other: " + (cmdline.split(" ", 1)[0].rsplit("/", 1)[-1] or "(kernel or gone)")


def machine_cpu() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / TICK


def sample(seen: dict[str, list], stop: threading.Event, every_s: float) -> None:
    while not stop.is_set():
        sample_once(seen)
        stop.wait(every_s)


def sample_once(seen: dict[str, list]) -> None:
    """Each process's command line and CPU-seconds so far, by pid and start time (one process)."""
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        entry = seen.setdefault(f"{pid}:{fields[19]}", ["", 0.0])
        if cmdline:  # a process that exited reads empty: keep the name it had
            entry[0] = cmdline
        entry[1] = (int(fields[11]) + int(fields[12])) / TICK


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=float, default=0.3, help="seconds between samples")
    ap.add_argument("--json", type=Path, help="also write every process seen (command line, CPU-seconds)")
    ap.add_argument("--top", type=int, default=30, help="kinds printed")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to measure after --")
    before: dict[str, list] = {}
    sample_once(before)  # what the processes already running had used: not the command's
    seen: dict[str, list] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(seen, stop, args.every), daemon=True)
    cpu0, t0 = machine_cpu(), time.monotonic()
    sampler.start()
    rc = subprocess.call(command)
    stop.set()
    sampler.join()
    machine, wall = machine_cpu() - cpu0, time.monotonic() - t0
    by_kind: Counter[str] = Counter()
    count: Counter[str] = Counter()
    used_by: dict[str, list] = {}
    for key, (cmdline, cpu) in seen.items():
        used = cpu - before.get(key, ["", 0.0])[1]
        if used > 0:
            used_by[key] = [cmdline, round(used, 2)]
            by_kind[kind_of(cmdline)] += used
            count[kind_of(cmdline)] += 1
    total = sum(by_kind.values())
    print(f"\n{wall:.0f} s, {machine:.0f} CPU-s on the machine (/proc/stat), {total:.0f} CPU-s in the processes seen")
    print("| kind | processes | CPU-s | share |\n|---|---|---|---|")
    for kind, cpu in by_kind.most_common(args.top):
        print(f"| {kind} | {count[kind]} | {cpu:.1f} | {100 * cpu / max(total, 1e-9):.1f} % |")
    if args.json:
        args.json.write_text(json.dumps({"wall_s": wall, "machine_cpu_s": machine, "processes": used_by}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
