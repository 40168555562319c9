"""Service benchmark: submit-to-running latency of smoke jobs, and requests/s of ``GET /v1/jobs``.

It starts a real local stack with ``inco up`` (SQLite, Redis, a local Ray, the API and one worker)
in a temporary INCO_HOME, then:

1. submits ``--jobs`` smoke jobs one after another, each when the worker is idle (the previous job
   has ended), and reads the latency from the store's timestamps (``started_at - created_at``: the
   API stored the job, Redis carried its id, the worker picked it up and marked it running) and
   from the client's side (POST sent until a GET first shows ``running``);
2. drives ``GET /v1/jobs?limit=50`` from ``--concurrency`` client threads on loopback for
   ``--seconds`` and reports requests/s, latency percentiles and errors.

    .venv/bin/python bench/service.py --jobs 50 --seconds 15 --concurrency 8

Writes ``bench/results/service-cpu.{md,json}`` (``--out`` to change). Redis database 9 is flushed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker.main import free_port  # noqa: E402

SPEC = {"ratios": ["1:16"], "preset": "smoke", "overrides": {"pretrain.max_images": 64, "finetune.epochs": 1}}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def latency_run(api: httpx.Client, jobs: int) -> list[dict[str, float]]:
    rows = []
    for i in range(jobs):
        t0 = time.perf_counter()
        r = api.post("/v1/jobs", json={"spec": SPEC})
        r.raise_for_status()
        job_id = r.json()["id"]
        seen_running = None
        while True:
            job = api.get(f"/v1/jobs/{job_id}").json()
            if seen_running is None and job["status"] != "queued":
                seen_running = time.perf_counter() - t0
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.02 if seen_running is None else 0.25)
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job_id} ended {job['status']}: {job['error']}")
        server = parse_time(job["started_at"]) - parse_time(job["created_at"])
        total = parse_time(job["finished_at"]) - parse_time(job["created_at"])
        rows.append({"server_s": server, "client_s": seen_running or 0.0, "job_s": total})
        print(
            f"job {i + 1}/{jobs}: running after {server * 1000:.0f} ms (client {seen_running * 1000:.0f} ms), "
            f"ended after {total:.1f} s",
            flush=True,
        )
    return rows


def load_run(base: str, token: str, seconds: float, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        nonlocal errors
        mine: list[float] = []
        bad = 0
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    ok = c.get("/v1/jobs", params={"limit": 50}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                mine.append(time.perf_counter() - t)
                bad += not ok
        with lock:
            latencies.extend(mine)
            errors += bad

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": wall,
        "rps": len(latencies) / wall,
        "p50_ms": pct(latencies, 50) * 1000,
        "p95_ms": pct(latencies, 95) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "neu-cls")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "service-cpu")
    args = ap.parse_args()

    from redis import Redis

    Redis.from_url(args.redis).flushdb()
    home = Path(tempfile.mkdtemp(prefix="inco-bench-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INCO_", "RAY_"))}
    env.update(INCO_HOME=str(home), INCO_REDIS_URL=args.redis)
    inco = [sys.executable, "-m", "cli.main"]
    subprocess.run([*inco, "up", "--port", str(port), "--data", str(args.data)], cwd=REPO, env=env, check=True)
    try:
        state = json.loads((home / "stack.json").read_text())
        base = state["api_url"]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {state['token']}"}, timeout=30) as api:
            t0 = time.perf_counter()
            rows = latency_run(api, args.jobs)
            latency_wall = time.perf_counter() - t0
        load = load_run(base, state["token"], args.seconds, args.concurrency)
    finally:
        subprocess.run([*inco, "down"], cwd=REPO, env=env, check=False)

    server = [r["server_s"] * 1000 for r in rows]
    client = [r["client_s"] * 1000 for r in rows]
    jobs_s = [r["job_s"] for r in rows]
    summary = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "command": "python bench/service.py " + " ".join(sys.argv[1:]),
        "spec": SPEC,
        "latency_ms": {
            "server_median": statistics.median(server),
            "server_p95": pct(server, 95),
            "server_max": max(server),
            "client_median": statistics.median(client),
            "client_p95": pct(client, 95),
        },
        "job_seconds": {"median": statistics.median(jobs_s), "p95": pct(jobs_s, 95)},
        "latency_wall_s": latency_wall,
        "load": {**load, "concurrency": args.concurrency, "route": "GET /v1/jobs?limit=50", "jobs_in_store": args.jobs},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    lat, ld = summary["latency_ms"], summary["load"]
    args.out.with_suffix(".md").write_text(
        f"""# Service benchmark ({summary["date"]})

Machine: {summary["machine"]}, no GPU; one local stack from `inco up` (SQLite, Redis, local Ray, the
API under uvicorn, one worker), all on loopback on the same 2 cores.

Command: `{summary["command"]}`

## Submit-to-running latency, {len(rows)} smoke jobs

Each job (`{json.dumps(SPEC)}`) was submitted when the worker was idle. Server side: `started_at -
created_at` from the store (API insert, Redis enqueue, RQ dequeue, work-horse fork, the job marked
running). Client side: from sending `POST /v1/jobs` until a poll (every 20 ms) first saw `running`.

| | median | p95 | max |
|---|---|---|---|
| server timestamps | {lat["server_median"]:.0f} ms | {lat["server_p95"]:.0f} ms | {lat["server_max"]:.0f} ms |
| client observed | {lat["client_median"]:.0f} ms | {lat["client_p95"]:.0f} ms | |

Whole job (queued to succeeded): median {summary["job_seconds"]["median"]:.1f} s, p95
{summary["job_seconds"]["p95"]:.1f} s, most of it Ray Train starting a worker group (about 10 s here)
before a few seconds of training.

## `GET /v1/jobs?limit=50` under load

{args.concurrency} client threads with keep-alive connections for {ld["seconds"]:.0f} s, {args.jobs} jobs in the
store, one uvicorn process sharing the 2 cores with the load generator:

| requests | errors | requests/s | p50 | p95 | p99 |
|---|---|---|---|---|---|
| {ld["requests"]} | {ld["errors"]} | {ld["rps"]:.0f} | {ld["p50_ms"]:.1f} ms | {ld["p95_ms"]:.1f} ms | {ld["p99_ms"]:.1f} ms |
"""
    )
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
