"""bench/cpu_by_process.py: what it says a command's processes spent, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "cpu_by_process.py"
BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.8: pass"


def test_a_busy_child_is_counted_under_its_kind(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--every", "0.1", "--json", str(out), "--", sys.executable, "-c", BUSY],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(out.read_text())["processes"]
    busy = [cpu for cmdline, cpu in seen.values() if "process_time" in cmdline]
    assert len(busy) == 1 and 0.4 <= busy[0] <= 3, seen  # the child's own 0.8 s, not what ran before it
    assert "| other: python" in proc.stdout and "CPU-s on the machine" in proc.stdout


def test_the_kinds_of_ray_and_service_processes() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from cpu_by_process import kind_of
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert kind_of("ray::TrainController") == "ray actor: TrainController"
    assert kind_of("/x/ray/core/src/ray/raylet/raylet --raylet_socket_name=s") == "ray head: raylet"
    assert kind_of("/x/.venv/bin/python -m cli.main worker") == "inco worker and work horses"
    assert kind_of("") == "other: (kernel or gone)"


def test_no_command_is_an_error() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "give the command to measure after --" in proc.stderr
