"""Fault injection against a running service: how many jobs are lost and how many results are stored
twice when the worker, the API, Redis and the database fail while jobs run.

The service is the real one, as processes (tests/chaos.py): `inco serve`, `inco worker`, a private
`redis-server` with the deploy config's append-only persistence (deploy/redis/redis.conf), PostgreSQL
(127.0.0.1:5432) behind a TCP proxy, and a local Ray head. Each round submits one longer job (SimSiam,
12 pretraining epochs on 96 images, sent with an Idempotency-Key) and two smoke jobs, then, while the
long job trains:

1. ``kill -9`` of the worker and its work horse, and a new worker at once (time until the job's next
   attempt starts is the pick-up time);
2. the database link cut for 10 s;
3. ``kill -9`` of the API and a new API; the long job is submitted again with the same Idempotency-Key
   (a client retrying after the crash), which must answer with the same job;
4. ``kill -9`` of Redis (no shutdown save), a submit while it is down (must answer 503 and store
   nothing), and a restart from the append-only file.

Then it waits for every job to end and audits each: status, attempts, metric rows stored twice, result
rows (one expected).

    .venv/bin/python bench/faults.py                 # 3 rounds
    .venv/bin/python bench/faults.py --rounds 1

Writes ``bench/results/faults-cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.chaos import SMOKE, Chaos, chaos_service, wait_until  # noqa: E402
from worker.main import ray_env, start_local_ray, stop_local_ray  # noqa: E402

LONG = {"spec": {**SMOKE["spec"], "method": "simsiam", "overrides": {"pretrain.epochs": 12, "pretrain.max_images": 96}}}
FAULTS = ["worker kill -9", "database cut 10 s", "API kill -9", "Redis kill -9"]


def epochs(svc: Chaos, job_id: str) -> int:
    return len(svc.epochs(job_id))


def one_round(svc: Chaos, n: int, record: dict) -> list[str]:
    key = f"bench-round-{n}-{secrets.token_hex(3)}"
    long = {"spec": {**LONG["spec"], "seeds": [n]}}  # a seed of its own: no stored backbone to reuse
    r = svc.http("POST", "/v1/jobs", json=long, headers={"Idempotency-Key": key})
    assert r.status_code == 201, r.text
    long_id = r.json()["id"]
    ids = [long_id, svc.submit({"spec": {**SMOKE["spec"], "seeds": [100 + 2 * n]}})]
    ids.append(svc.submit({"spec": {**SMOKE["spec"], "seeds": [101 + 2 * n]}}))
    inj = record["injected"]

    wait_until(lambda: epochs(svc, long_id) >= 2, "the long job trains", 600, 0.5)
    attempts = svc.job(long_id)["attempts"]
    svc.worker.kill9()
    killed = time.monotonic()
    svc.worker.start()
    inj["worker kill -9"] += 1
    wait_until(lambda: svc.job(long_id)["attempts"] > attempts, "a new attempt", 600, 0.5)
    record["pickup_s"].append(round(time.monotonic() - killed, 1))

    at = epochs(svc, long_id)
    wait_until(lambda: epochs(svc, long_id) >= min(at + 1, 12) or svc.job(long_id)["status"] != "running", "", 600)
    svc.proxy.cut()
    inj["database cut 10 s"] += 1
    time.sleep(10)
    svc.proxy.restore()
    wait_until(lambda: httpx.get(svc.api.url + "/readyz", timeout=5).status_code == 200, "ready", 120)

    svc.api.kill9()
    inj["API kill -9"] += 1
    svc.api.start()
    r = svc.http("POST", "/v1/jobs", json=long, headers={"Idempotency-Key": key})
    record["idempotent_retries"] += 1
    if r.status_code == 200 and r.json()["id"] == long_id:
        record["idempotent_same_job"] += 1

    svc.redis.kill()
    inj["Redis kill -9"] += 1
    r = svc.http("POST", "/v1/jobs", json=SMOKE)
    record["submits_while_redis_down"] += 1
    if r.status_code == 503:
        record["answered_503"] += 1
    time.sleep(3)
    svc.redis.start()
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "neu-cls"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "faults-cpu.md"))
    parser.add_argument("--report-from", help="rewrite the markdown from a saved JSON record, run nothing")
    args = parser.parse_args()
    if args.report_from:
        Path(args.out).write_text(report(json.loads(Path(args.report_from).read_text())))
        return

    home = Path(tempfile.mkdtemp(prefix="inco-bench-faults-"))
    ray_proc, address = start_local_ray(home / "ray-home")
    record: dict = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {os.cpu_count()} CPU cores, no GPU",
        "command": "python bench/faults.py " + " ".join(sys.argv[1:]),
        "rounds": args.rounds,
        "injected": dict.fromkeys(FAULTS, 0),
        "pickup_s": [],
        "idempotent_retries": 0,
        "idempotent_same_job": 0,
        "submits_while_redis_down": 0,
        "answered_503": 0,
        "jobs": [],
    }
    t0 = time.monotonic()
    try:
        env = {**ray_env(home / "ray-home"), "RAY_ADDRESS": address}
        with chaos_service(home, Path(args.data), env, db_password="bench-" + secrets.token_hex(4)) as svc:
            svc.worker.start()
            ids: list[str] = []
            for n in range(args.rounds):
                ids += one_round(svc, n, record)
                print(f"round {n + 1}/{args.rounds} injected; {time.monotonic() - t0:.0f} s", flush=True)
            for job_id in ids:
                svc.wait(job_id, 1200)
                record["jobs"].append({"id": job_id, **svc.audit(job_id)})
            record["jobs_in_store"] = len(svc.http("GET", "/v1/jobs", params={"limit": 500}).json())
    finally:
        stop_local_ray(ray_proc)
    record["wall_s"] = round(time.monotonic() - t0)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.write_text(report(record))
    print(out.read_text())


def report(r: dict) -> str:
    jobs = r["jobs"]
    lost = [j for j in jobs if j["status"] != "succeeded"]
    dup_results = sum(max(0, j["results"] - 1) for j in jobs)
    dup_metrics = sum(j["duplicated_metrics"] for j in jobs)
    lines = [
        "# Fault injection",
        "",
        f"Measured {r['when']} on {r['machine']} with `{r['command']}` ({r['wall_s']} s in all).",
        "The service ran as processes: `inco serve`, `inco worker`, `redis-server` with deploy/redis/redis.conf "
        "(appendonly, appendfsync always), PostgreSQL behind a TCP proxy, a local Ray head. "
        f"{r['rounds']} round(s), each with one SimSiam job of 12 epochs and two smoke jobs; see bench/faults.py.",
        "",
        "| fault | injected |",
        "|---|---|",
        *[f"| {name} | {count} |" for name, count in r["injected"].items()],
        "",
        "| outcome | count |",
        "|---|---|",
        f"| jobs submitted (accepted) | {len(jobs)} |",
        f"| jobs lost (not succeeded) | {len(lost)} |",
        f"| results stored twice | {dup_results} |",
        f"| metric rows stored twice | {dup_metrics} |",
        f"| submits while Redis was down answered 503 | {r['answered_503']} of {r['submits_while_redis_down']} |",
        f"| retries with the same Idempotency-Key that got the same job | "
        f"{r['idempotent_same_job']} of {r['idempotent_retries']} |",
        f"| jobs in the store at the end | {r.get('jobs_in_store', '?')} (accepted: {len(jobs)}) |",
        "",
        f"Pick-up after the worker kill (until the job's next attempt started): {r['pickup_s']} s, with "
        "INCO_HEARTBEAT_S=2 and INCO_MAINTENANCE_S=5. RQ 2.12 marks a job abandoned once its heartbeat key "
        "expires (INCO_HEARTBEAT_S + 60 s), a worker's maintenance pass then queues it again behind the jobs "
        "already waiting (here the round's smoke jobs), so the bound is about heartbeat + 60 s + maintenance "
        "interval + the queue ahead of it.",
        "",
        "| job | status | attempts | results | metric rows twice |",
        "|---|---|---|---|---|",
        *[
            f"| {j['id'][:8]} | {j['status']} | {j['attempts']} | {j['results']} | {j['duplicated_metrics']} |"
            for j in jobs
        ],
    ]
    if lost:
        lines += ["", "Errors of the jobs that did not succeed:", ""]
        lines += [f"- {j['id'][:8]}: {j['error']}" for j in lost]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
