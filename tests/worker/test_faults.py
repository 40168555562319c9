"""Faults injected into a running service, all real: the API (`inco serve`) and the worker
(`inco worker`) as processes that get ``kill -9``, a private Redis with the deploy config's append-only
persistence that gets killed and restarted, and PostgreSQL behind a TCP proxy whose link gets cut.

Every test ends by checking that no job was lost and no metric or result was stored twice."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from cli.stack import descendants
from server.store import access
from server.store.db import session_scope
from server.store.models import Job, JobStatus, utcnow
from tests.chaos import Chaos, alive, chaos_service, pids_running, wait_until
from tests.worker.conftest import SMOKE

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SECRET = "s3cret-" + secrets.token_hex(4)  # the database password: it must never reach a file
LONG = {"spec": {**SMOKE["spec"], "method": "simsiam", "overrides": {"pretrain.epochs": 12, "pretrain.max_images": 96}}}
ORDER = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2, "canceled": 2}


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory, neu_path: Path, local_ray: dict[str, str]) -> Iterator[Chaos]:
    with chaos_service(tmp_path_factory.mktemp("chaos-home"), neu_path, local_ray, db_password=SECRET) as svc:
        yield svc


def test_redis_killed_and_restarted_keeps_the_queue(chaos: Chaos) -> None:
    """With no worker running, two jobs wait in Redis; Redis is killed (SIGKILL, no shutdown save):
    submits answer 503 and store nothing, /readyz names Redis; restarted, Redis still holds both jobs
    from its append-only file, the API recovers by itself, and a worker runs all of them."""
    chaos.worker.stop()
    ids = [chaos.submit(), chaos.submit({"spec": {**SMOKE["spec"], "seeds": [1]}})]
    chaos.redis.kill()
    r = chaos.http("POST", "/v1/jobs", json=SMOKE)
    assert r.status_code == 503 and "Redis unreachable" in r.json()["detail"] and r.headers["Retry-After"]
    ready = httpx.get(chaos.api.url + "/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["database"] == "ok" and "Redis" in ready.json()["redis"]
    assert len(chaos.http("GET", "/v1/jobs").json()) == 2  # nothing half-made
    chaos.redis.start()
    assert sorted(chaos.queued_in_redis()) == sorted(ids)  # the AOF kept them
    wait_until(lambda: httpx.get(chaos.api.url + "/readyz", timeout=5).status_code == 200, "ready again", 30)
    ids.append(chaos.submit())
    chaos.worker.start()
    for job_id in ids:
        chaos.check_intact(job_id)
    board = chaos.http("GET", "/v1/results").json()  # the leaderboard, on PostgreSQL: both seeds in one row
    assert [(r["ratio"], r["count"]) for r in board] == [("1:16", 2)] and 0 <= board[0]["mean"] <= 1, board


def test_database_cut_api_killed_and_redis_killed_while_a_job_runs(chaos: Chaos) -> None:
    """While a job trains, (1) the link to PostgreSQL is cut for 12 s: the API answers 503 and /readyz
    names the database, the worker keeps running and retries its writes; (2) the API gets kill -9 and
    a new API process starts; (3) Redis is killed for 5 s: the worker process does not exit (RQ itself
    quits on a lost Redis; `inco worker` waits for it and serves again) and a job submitted afterwards
    runs too. A client polling all along sees the states in order (never back from running to queued)
    and no 5xx outside the outages; the job ends with every epoch and its result stored once."""
    if not chaos.worker.alive:
        chaos.worker.start()
    pid = chaos.worker.proc.pid
    # 20 epochs: still training after the database outage and the API restart, when Redis is killed
    job_id = chaos.submit({"spec": {**LONG["spec"], "overrides": {**LONG["spec"]["overrides"], "pretrain.epochs": 20}}})
    seen: list[str] = []
    errors: list[str] = []
    outage = threading.Event()
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                r = chaos.http("GET", f"/v1/jobs/{job_id}")
            except httpx.TransportError:
                time.sleep(0.2)  # the API is down: clients retry
                continue
            if r.status_code != 200 and not (outage.is_set() and r.status_code == 503):
                errors.append(f"{r.status_code} {r.text[:200]}")
            elif r.status_code == 200 and (not seen or seen[-1] != r.json()["status"]):
                seen.append(r.json()["status"])
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        wait_until(lambda: len(chaos.epochs(job_id)) >= 2, "training under way", 240)
        outage.set()
        chaos.proxy.cut()
        try:
            r = chaos.http("GET", "/v1/jobs")
            assert r.status_code == 503 and "database" in r.json()["detail"], r.text
            ready = httpx.get(chaos.api.url + "/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["database"] != "ok"
            time.sleep(12)
            assert chaos.worker.alive and chaos.api.alive  # no crash loop
        finally:
            chaos.proxy.restore()
        wait_until(lambda: httpx.get(chaos.api.url + "/readyz", timeout=5).status_code == 200, "ready again", 60)
        outage.clear()
        chaos.api.kill9()
        time.sleep(2)
        chaos.api.start()
        assert chaos.job(job_id)["status"] == "running", "the job ended before Redis could be killed"
        outage.set()  # a Redis outage: submits and readiness answer 503
        chaos.redis.kill()
        time.sleep(5)
        chaos.redis.start()
        wait_until(lambda: httpx.get(chaos.api.url + "/readyz", timeout=5).status_code == 200, "ready again", 60)
        outage.clear()
        after = chaos.submit({"spec": {**SMOKE["spec"], "seeds": [2]}})
        chaos.check_intact(job_id, epochs=20)
        chaos.check_intact(after)
    finally:
        stop.set()
        poller.join(5)
    assert errors == []
    assert [ORDER[s] for s in seen] == sorted(ORDER[s] for s in seen) and seen[-1] == "succeeded", seen
    log = (chaos.home / "worker.log").read_text()
    assert "not stored" in log  # the worker did wait for the store
    assert "lost Redis" in log or "waiting for Redis" in log
    assert chaos.worker.alive and chaos.worker.proc.pid == pid


def _running_again(chaos: Chaos, job_id: str, attempts: int) -> float:
    """Seconds from now until the job's next attempt started (a kill just happened)."""
    killed = time.monotonic()
    wait_until(lambda: chaos.job(job_id)["attempts"] > attempts, "a new attempt", 120, 0.2)
    return time.monotonic() - killed


def test_a_killed_horse_worker_or_machine_is_picked_up_in_seconds(chaos: Chaos) -> None:
    """One job, three deaths while it runs, each survived within seconds and resumed from its last
    epoch. Two workers serve the queue: a machine with a Ray head of its own, and a worker on the
    shared Ray head. (1) The job's work horse on the machine gets kill -9: the worker runs it again at
    once. (2) The worker dies with its work horse (kill -9 of its process tree; the shared Ray head
    lives on): the machine takes the job over once its lease lapses, and the worker is started again.
    (3) The whole machine dies (worker, work horse, Ray head and Ray workers) as soon as the worker is
    back: the worker takes the job over. The job ends with every epoch and its result stored once.

    Who takes each attempt is set by who serves the queue at the time, so the order is the same in
    every run: the machine alone takes the first attempt; the worker, waiting on the queue while the
    machine handles its dead horse, the second; the machine, alone while the worker starts again, the
    third; the worker, alone then, the fourth. The one started again is the worker (seconds; the
    machine also starts a Ray head), once the machine took its job over, and it serves the queue
    long before the job (24 epochs) ends."""
    chaos.worker.stop()
    worker, machine = chaos.worker, chaos.new_worker("machine", own_ray=True)
    runners = {"worker": worker, "machine": machine}

    def runs_on() -> str:
        """Which of the two runs the job's work horse now."""
        horse = chaos.horse_pid(job_id)
        on = [n for n, p in runners.items() if p.alive and horse in [p.proc.pid, *descendants(p.proc.pid)]]
        assert len(on) == 1, f"horse {horse} is not under one of the workers ({on})"
        return on[0]

    def kill(name: str) -> None:
        runner = runners[name]
        tree = [runner.proc.pid, *descendants(runner.proc.pid)]
        heads = [pid for pid in tree if pid in pids_running("--head")]
        assert bool(heads) == (name == "machine")  # the machine dies with its Ray head, the worker without
        runner.kill9()
        wait_until(lambda: not [pid for pid in tree if alive(pid)], "every process gone", 10)
        chaos.note(f"killed the {name} and its processes")

    def training_goes_on() -> None:
        # how soon an attempt trains depends on the load (a Ray Train start is ~150 CPU-s, and in CI a
        # search runs beside this), so these waits are long; how soon the next attempt starts is bounded
        wait_until(lambda: chaos.epochs(job_id) != [], "training under way", 600)
        at = max(chaos.epochs(job_id))
        wait_until(lambda: max(chaos.epochs(job_id)) > at, "training goes on", 600)

    machine.start()
    wait_until(lambda: chaos.listening(machine), "the machine listening", 300, 1)
    spec = {**LONG["spec"], "seeds": [1], "overrides": {**LONG["spec"]["overrides"], "pretrain.epochs": 24}}
    job_id = chaos.submit({"spec": spec})  # seed 1: seed 0's backbone is stored and would be reused
    took: list[float] = []
    try:
        with chaos.explained(job_id):
            wait_until(lambda: chaos.job(job_id)["attempts"] == 1, "the first attempt", 120)
            worker.start()
            wait_until(lambda: chaos.listening(worker), "the worker listening", 300, 1)
            chaos.note("the worker listening")
            for dies, then in (("horse", "worker"), ("worker", "machine"), ("machine", "worker")):
                if dies != "machine":  # the machine dies as soon as the worker is back, in whatever phase
                    training_goes_on()
                job = chaos.job(job_id)
                assert job["status"] == "running", "the job ended before its deaths: make it longer"
                attempts, horse = job["attempts"], chaos.horse_pid(job_id)
                assert horse is not None and alive(horse)
                assert runs_on() == ("machine" if dies == "horse" else dies), f"attempt {attempts} runs elsewhere"
                chaos.note(f"attempt {attempts} at epoch {max(chaos.epochs(job_id), default=0)}: the {dies} dies")
                if dies == "horse":
                    os.kill(horse, signal.SIGKILL)
                else:
                    kill(dies)
                took.append(_running_again(chaos, job_id, attempts))
                chaos.note(f"attempt {attempts + 1} started after {took[-1]:.1f} s (horse {chaos.horse_pid(job_id)})")
                assert not alive(horse)
                assert runs_on() == then, f"attempt {attempts + 1} should run on the {then}"
                if dies == "worker":  # back once the machine took the job over, to take it when the machine dies
                    worker.start()
                    wait_until(lambda: chaos.listening(worker), "the worker listening again", 300, 1)
                    chaos.note("the worker listening again")
            print(f"running again after {', '.join(f'{t:.1f}' for t in took)} s (horse, worker, machine)")
            assert max(took) < 30, took  # lease 6 s + a pass each second; CI machines are busy
            job = chaos.check_intact(job_id, epochs=24, timeout_s=600)
            assert job["attempts"] == 4
    finally:
        machine.stop()
    with session_scope(chaos.engine) as s:  # the last attempt resumed from a checkpoint, not from epoch 0
        art = access.find_artifact(s, team_id=1, kind="backbone", key=job["outputs"]["backbones"][0]["key"])
    import torch

    assert torch.load(art.path, weights_only=True)["meta"]["resumed_at_epoch"] >= 1


def test_a_job_that_keeps_crashing_stops_after_its_retry_budget(chaos: Chaos) -> None:
    """Every attempt crashes (its run folder is a file): the job runs 1 + INCO_JOB_RETRIES (3) times,
    then ends failed with the last error."""
    chaos.worker.stop()
    job_id = chaos.submit()
    run_dir = chaos.home / "artifacts" / "runs" / job_id
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    run_dir.write_text("in the way")
    chaos.worker.start()
    job = chaos.wait(job_id, 300)
    assert job["status"] == "failed" and job["attempts"] == 4, job
    assert "Error" in job["error"] and "retry" not in job["error"], job["error"]
    crashes = [m for m in chaos.http("GET", f"/v1/jobs/{job_id}/logs").json() if "attempt crashed" in m["message"]]
    assert len(crashes) == 4


def test_stuck_and_lost_jobs_are_found_and_run(chaos: Chaos) -> None:
    """Redis loses everything (FLUSHALL) while the store holds a queued job and a running job whose
    worker is gone (no heartbeat): a starting worker's recovery pass queues both again and runs them."""
    chaos.worker.stop()
    lost, stuck = chaos.submit(), chaos.submit()
    with session_scope(chaos.engine) as s:
        past = utcnow() - timedelta(hours=1)
        for job_id in (lost, stuck):
            job = s.get(Job, job_id)
            job.created_at = past
            if job_id == stuck:
                job.status, job.attempts, job.started_at, job.heartbeat_at = JobStatus.running, 1, past, past
            s.add(job)
    from redis import Redis

    Redis.from_url(chaos.redis.url).flushall()
    chaos.worker.start()
    chaos.check_intact(lost)
    job = chaos.check_intact(stuck)
    assert job["attempts"] == 2
    with session_scope(chaos.engine) as s:
        assert any("no heartbeat since" in m.message for m in access.list_logs(s, job_id=stuck))
        assert any("the queue had lost it" in m.message for m in access.list_logs(s, job_id=lost))


def test_no_secret_reaches_a_file(chaos: Chaos) -> None:
    """The database password is in no file the service wrote: run folders, Ray Train state, logs."""
    chaos.worker.stop()
    hits = []
    for path in chaos.home.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 * 2**20 and SECRET.encode() in path.read_bytes():
            hits.append(str(path.relative_to(chaos.home)))
    assert hits == []
