"""Where the test suite's time goes: run the README's test command with ``--durations=0``, time it,
and write the slowest files and tests first.

    .venv/bin/python bench/ci_time.py                        # runs scripts/test.sh, then ruff (as .ci/run)
    .venv/bin/python bench/ci_time.py --from-log run.txt     # a saved pytest output with --durations=0

Writes ``bench/results/ci-time.md`` (and ``.json``); ``--label`` names the run in the report, and a
run is added to the ones already in the JSON file (``--keep`` of them, newest last), so the report
shows before and after side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DURATION = re.compile(r"^([0-9.]+)s (call|setup|teardown)\s+(\S+)")
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed)[^=\n]*?) in ([0-9.]+)s", re.MULTILINE)


def parse(log: str) -> dict:
    tests: dict[str, float] = {}
    for line in log.splitlines():
        m = DURATION.match(line.strip())
        if m:
            tests[m.group(3)] = tests.get(m.group(3), 0.0) + float(m.group(1))
    files: dict[str, float] = {}
    for nodeid, seconds in tests.items():
        files[nodeid.split("::")[0]] = files.get(nodeid.split("::")[0], 0.0) + seconds
    summary = SUMMARY.search(log)
    return {
        "tests": dict(sorted(tests.items(), key=lambda kv: -kv[1])),
        "files": dict(sorted(files.items(), key=lambda kv: -kv[1])),
        "outcome": summary.group(1) if summary else "?",
        "pytest_s": float(summary.group(2)) if summary else None,
    }


def run_suite(extra: list[str]) -> tuple[str, float, float]:
    """The README's test command with durations, then the linters, as .ci/run runs them."""
    t0 = time.monotonic()
    out = subprocess.run(
        ["bash", "scripts/test.sh", "-q", "--durations=0", *extra], cwd=REPO, capture_output=True, text=True
    )
    tests_s = time.monotonic() - t0
    for lint in (["check", "."], ["format", "--check", "."]):
        subprocess.run([str(REPO / ".venv" / "bin" / "ruff"), *lint], cwd=REPO, capture_output=True, check=False)
    return out.stdout + out.stderr, tests_s, time.monotonic() - t0


def report(runs: list[dict]) -> str:
    lines = [
        "# Where the test suite's time goes",
        "",
        "Each run: the README's test command (`scripts/test.sh -q --durations=0`, what `.ci/run` calls) and the "
        "linters, on the machine named. Per file: setup + call + teardown of its tests, summed (under "
        "pytest-xdist two files run at once, so the files add up to more than the wall time).",
        "",
        "| run | when | machine | outcome | pytest wall | .ci/run wall |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        wall = f"{r['ci_s'] / 60:.1f} min" if r.get("ci_s") else "?"
        pytest_s = f"{r['pytest_s'] / 60:.1f} min" if r.get("pytest_s") else "?"
        lines.append(f"| {r['label']} | {r['when']} | {r['machine']} | {r['outcome']} | {pytest_s} | {wall} |")
    for r in runs:
        lines += ["", f"## {r['label']}", ""]
        if r.get("note"):
            lines += [r["note"], ""]
        lines += ["Slowest files:", "", "| file | seconds |", "|---|---|"]
        lines += [f"| {name} | {s:.1f} |" for name, s in list(r["files"].items())[:20]]
        lines += ["", "Slowest tests (setup + call + teardown):", "", "| test | seconds |", "|---|---|"]
        lines += [f"| {name} | {s:.1f} |" for name, s in list(r["tests"].items())[:30]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from-log", help="a saved pytest output (with --durations=0) instead of a run")
    ap.add_argument("--label", default="this run")
    ap.add_argument("--note", default="", help="a sentence on how the run was made")
    ap.add_argument("--ci-seconds", type=float, help="the .ci/run wall time of a saved log, when known")
    ap.add_argument("--keep", type=int, default=3, help="runs kept in the report")
    ap.add_argument("--when", help="when a saved log was made (default: now)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ci-time.md"))
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments for the run")
    args = ap.parse_args()
    if args.from_log:
        log, ci_s = Path(args.from_log).read_text(), args.ci_seconds
    else:
        log, _, ci_s = run_suite(args.pytest_args)
    run = {
        "label": args.label,
        "note": args.note,
        "when": args.when or datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {os.cpu_count()} CPU cores, no GPU",
        "ci_s": ci_s,
        **parse(log),
    }
    out = Path(args.out)
    saved = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else []
    runs = [*[r for r in saved if r["label"] != run["label"]], run][-args.keep :]
    out.with_suffix(".json").write_text(json.dumps(runs, indent=2) + "\n")
    out.write_text(report(runs))
    print(out.read_text())
    sys.exit(0 if "failed" not in run["outcome"] and "error" not in run["outcome"] else 1)


if __name__ == "__main__":
    main()
