"""Fault injection against a running service: how many jobs are lost and how many results are stored
twice when the worker, the API, Redis and the database fail while jobs run, and how fast a job whose
process died runs again.

The service is the real one, as processes (tests/chaos.py): `inco serve`, `inco worker`s, a private
`redis-server` with the deploy config's append-only persistence (deploy/redis/redis.conf), PostgreSQL
(127.0.0.1:5432) behind a TCP proxy, and Ray heads.

Part 1, mixed rounds (``--rounds``). Each round submits one longer job (SimSiam, 12 pretraining epochs
on 96 images, sent with an Idempotency-Key) and two smoke jobs, then, while the long job trains:

1. ``kill -9`` of the worker and its work horse, and a new worker at once;
2. the database link cut for 10 s;
3. ``kill -9`` of the API and a new API; the long job is submitted again with the same Idempotency-Key
   (a client retrying after the crash), which must answer with the same job;
4. ``kill -9`` of Redis (no shutdown save), a submit while it is down (must answer 503 and store
   nothing), and a restart from the append-only file.

Part 2, kill series (``--kills`` per kind): one long job per kind is killed again and again while it
trains, and each time the time from the kill until the job runs again is measured ("death -> running":
its next attempt started, or for a Ray Train worker its worker group restarted), and until its next
epoch was stored. Two workers serve the queue, as two machines would:

- ``worker``: ``kill -9`` of a worker and its work horse (the shared Ray head survives); a new worker
  starts in its place;
- ``horse``: ``kill -9`` of the work horse only; its worker sees it die and retries it at once;
- ``ray-worker``: ``kill -9`` of the Ray Train worker process; Ray Train restarts the worker group
  from the last checkpoint (``INCO_TRAIN_RESTARTS``);
- ``machine``: both workers run a Ray head of their own; ``kill -9`` of everything of the machine that
  runs the job (worker, work horse, its Ray head and Ray workers); the other machine takes the job over
  once its lease lapses (``INCO_LEASE_S``).

Then it waits for every job to end and audits each: status, attempts, metric rows stored twice, result
rows (one expected), and whether any attempt started while the process of an earlier one still lived.

    .venv/bin/python bench/faults.py                       # 1 round, 6 kills of each kind
    .venv/bin/python bench/faults.py --rounds 0 --kills 2

Writes ``bench/results/faults-cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import signal
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli.stack import descendants  # noqa: E402
from tests.chaos import SMOKE, Chaos, Process, alive, chaos_service, pids_running, wait_until  # noqa: E402
from worker.main import ray_env, start_local_ray, stop_local_ray  # noqa: E402

LONG = {"spec": {**SMOKE["spec"], "method": "simsiam", "overrides": {"pretrain.epochs": 12, "pretrain.max_images": 96}}}
FAULTS = ["worker kill -9", "database cut 10 s", "API kill -9", "Redis kill -9"]
KINDS = ["worker", "horse", "ray-worker", "machine"]
SETTINGS = {"INCO_JOB_RETRIES": "30", "INCO_TRAIN_RESTARTS": "30"}  # every kill is survived, none fails the job


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


def last_epoch(svc: Chaos, job_id: str) -> int:
    return max(svc.epochs(job_id), default=0)


def restarts_logged(svc: Chaos, job_id: str) -> int:
    logs = svc.http("GET", f"/v1/jobs/{job_id}/logs").json()
    return sum("from the last checkpoint" in m["message"] for m in logs)


def machine_of(pid: int, machines: list[Process]) -> Process:
    for m in machines:
        if m.proc is not None and (pid == m.proc.pid or pid in descendants(m.proc.pid)):
            return m
    raise AssertionError(f"no worker runs pid {pid}")


def one_kill(svc: Chaos, kind: str, job_id: str, machines: list[Process]) -> dict:
    """Kill what runs the job (``kind``), then time it until it runs again and until its next epoch."""
    attempts, restarts = svc.job(job_id)["attempts"], restarts_logged(svc, job_id)
    horse = svc.horse_pid(job_id)
    assert horse is not None, "the running job holds no lease"
    victim = None
    if kind == "ray-worker":
        victims = pids_running("RayTrainWorker")
        assert victims, "no Ray Train worker process found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
    elif kind == "horse":
        victims = [horse]
        os.kill(horse, signal.SIGKILL)
    else:  # worker / machine: the process tree of the worker that runs it (with its Ray head, if its own)
        victim = machine_of(horse, machines)
        victims = [victim.proc.pid, *descendants(victim.proc.pid)]
        victim.kill9()
    killed = time.monotonic()
    at_kill = last_epoch(svc, job_id)

    def back() -> str | None:
        if svc.job(job_id)["attempts"] > attempts:
            return "next attempt"
        if restarts_logged(svc, job_id) > restarts:
            return "worker group restart"
        return None

    how = wait_until(back, f"{kind} kill: running again", 300, 0.1)
    back_s = time.monotonic() - killed
    overlap = [pid for pid in victims if alive(pid)] if how == "next attempt" else []
    if victim is not None:
        victim.start()  # a new worker (machine) takes the place of the dead one
    wait_until(lambda: last_epoch(svc, job_id) > at_kill, f"{kind} kill: next epoch", 900, 0.2)
    epoch_s = time.monotonic() - killed
    return {"kind": kind, "back_s": round(back_s, 2), "epoch_s": round(epoch_s, 1), "how": how, "alive": overlap}


def kill_series(svc: Chaos, kind: str, kills: int, seed: int, machines: list[Process], record: dict) -> str:
    """One long job killed ``kills`` times (``kind``, see the module doc), each time once it trains again."""
    epochs = 3 * kills + 6
    spec = {**LONG["spec"], "seeds": [seed], "overrides": {"pretrain.epochs": epochs, "pretrain.max_images": 96}}
    job_id = svc.submit({"spec": spec})
    wait_until(lambda: last_epoch(svc, job_id) >= 1, f"{kind}: training under way", 900, 0.2)
    for n in range(kills):
        kill = one_kill(svc, kind, job_id, machines)
        record["kills"].append(kill)
        print(f"  {kind} kill {n + 1}/{kills}: running again after {kill['back_s']:.1f} s ({kill['how']})", flush=True)
    return job_id


def kill_phase(svc: Chaos, kills: int, record: dict) -> list[str]:
    ids = []
    svc.worker.stop()
    shared = [svc.new_worker("worker-a"), svc.new_worker("worker-b")]
    for w in shared:
        w.start()
    try:
        for i, kind in enumerate(["worker", "horse", "ray-worker"]):
            ids.append(kill_series(svc, kind, kills, 50 + i, shared, record))
            svc.wait(ids[-1], 1800)
    finally:
        for w in shared:
            w.stop()
    machines = [svc.new_worker("machine-a", own_ray=True), svc.new_worker("machine-b", own_ray=True)]
    for m in machines:
        m.start()
    try:
        ids.append(kill_series(svc, "machine", kills, 53, machines, record))
        svc.wait(ids[-1], 1800)
    finally:
        for m in machines:
            m.stop(grace_s=60)
    svc.worker.start()
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "neu-cls"))
    parser.add_argument("--rounds", type=int, default=1, help="mixed fault rounds (part 1)")
    parser.add_argument("--kills", type=int, default=6, help="kills of each kind (part 2)")
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
        "settings": SETTINGS,
        "kills_each": args.kills,
        "injected": dict.fromkeys(FAULTS, 0),
        "kills": [],
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
        password = "bench-" + secrets.token_hex(4)
        with chaos_service(home, Path(args.data), env, db_password=password, env_overrides=SETTINGS) as svc:
            svc.worker.start()
            ids: list[str] = []
            for n in range(args.rounds):
                ids += one_round(svc, n, record)
                print(f"round {n + 1}/{args.rounds} injected; {time.monotonic() - t0:.0f} s", flush=True)
            if args.kills:
                ids += kill_phase(svc, args.kills, record)
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


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a value that was measured)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def kill_table(kills: list[dict]) -> list[str]:
    if not kills:
        return []
    rows = []
    for kind in [*KINDS, "all"]:
        mine = [k for k in kills if kind in ("all", k["kind"])]
        if not mine:
            continue
        back = [k["back_s"] for k in mine]
        how = sorted({k["how"] for k in mine})
        rows.append(
            f"| {kind} | {len(mine)} | {statistics.median(back):.1f} | {pct(back, 95):.1f} | {max(back):.1f} | "
            f"{statistics.median(k['epoch_s'] for k in mine):.1f} | {', '.join(how)} | "
            f"{sum(bool(k['alive']) for k in mine)} |"
        )
    return [
        "",
        "## Death -> running again",
        "",
        "Each kill is timed from the `kill -9` until the job runs again (its next attempt started, or its Ray "
        "Train worker group restarted) and until its next epoch was stored (Ray's start-up and one epoch of "
        "training on CPU included). Seconds; p95 is nearest-rank.",
        "",
        "| kind | kills | p50 | p95 | max | p50 until next epoch | how it ran again | attempts started while a "
        "killed process lived |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Every kill: " + ", ".join(f"{k['kind']} {k['back_s']}" for k in kills) + ".",
    ]


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
        "(appendonly, appendfsync always), PostgreSQL behind a TCP proxy, Ray heads. "
        f"Part 1: {r['rounds']} mixed round(s), each with one SimSiam job of 12 epochs and two smoke jobs. "
        f"Part 2: one long SimSiam job per kind of kill, killed {r.get('kills_each', 0)} times while it trained, "
        "two workers serving the queue. See bench/faults.py; settings "
        + ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items())
        + " (so that no kill spends a job's retry budget).",
        "",
        "| fault | injected |",
        "|---|---|",
        *[f"| {name} | {count} |" for name, count in r["injected"].items()],
        *[f"| {kind} kill -9 (part 2) | {sum(k['kind'] == kind for k in r.get('kills', []))} |" for kind in KINDS],
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
        f"| attempts started while a killed process still lived | "
        f"{sum(bool(k['alive']) for k in r.get('kills', []))} |",
        "",
        f"Pick-up after the worker kill of each mixed round (until the job's next attempt started): "
        f"{r['pickup_s']} s, with the default INCO_LEASE_S=6.",
        *kill_table(r.get("kills", [])),
        "",
        "## Jobs",
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
