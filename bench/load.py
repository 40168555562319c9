"""Load benchmark: a mix of submits, status polls and leaderboard reads against the API on loopback
while a worker runs jobs.

It starts, in a temporary INCO_HOME (SQLite store, a flushed Redis database):

1. a token for team ``load`` with ``inco admin token create --scope read --scope submit``;
2. the API with ``inco serve`` (uvicorn) on a free port, with INCO_MAX_ACTIVE_JOBS high so the
   per-team limit of active jobs does not turn submits into 429 (any 429 is counted apart anyway);
3. a local Ray head and ``--workers`` ``inco worker`` processes (0: none), which run the submitted
   smoke jobs while the load is applied, at CPU priority ``--worker-nice`` (INCO_WORKER_NICE, default
   the service's 10, as ``inco up`` runs them: ``worker/priority.py``);

registers the NEU-CLS images as data set ``default`` with ``POST /v1/datasets``, submits one job and
waits until a worker runs it, then applies the load (asyncio clients over keep-alive connections) in
one or two runs on the same service, one after the other (``--mode``, default ``both``):

1. **closed loop** (saturation): ``--concurrency`` clients (8), each sending its next request when the
   last one is answered, for ``--duration-s`` (default 30 s). It measures the throughput the
   service can give; its latency is mostly queueing (clients / throughput, Little's law), so it is
   not the latency a plant team sees;
2. **open loop** (the targets): requests arrive at ``--rate`` per second (default 40; Poisson, seeded
   by ``--seed``) whatever the answers do, for ``--duration-s`` (default 60 s), at most
   ``--max-in-flight`` (64) at once: an arrival that finds them all in flight is not sent and is
   reported as dropped by the client. Latency counts from the scheduled arrival, so a late send
   counts too (no coordinated omission).

``--requests`` bounds each run (requests sent; arrivals, dropped ones included, in the open loop).
Each request is drawn from ``--mix`` (default ``submit=10,job=40,jobs=20,results=30``):

=========  ==========================================  ==============================================
kind       request                                     answer expected
=========  ==========================================  ==============================================
submit     ``POST /v1/jobs`` (a smoke job)             201 (429 counted apart: a per-team limit)
job        ``GET /v1/jobs/{id}`` of a submitted job    200
jobs       ``GET /v1/jobs?limit=50``                   200
results    ``GET /v1/results`` (the leaderboard)       200
=========  ==========================================  ==============================================

Per run and kind it reports requests, requests/s, p50/p90/p99/max latency and errors (any other
answer, or no answer), and the CPU the API, the workers (with Ray and its training processes,
sampled every 0.5 s so processes that end during the run count), the load generator and the rest of
the machine used. Targets, judged on the open-loop run: zero errors (and no arrival dropped), p99 under
200 ms for every read.

    .venv/bin/python bench/load.py                          # both runs, 30 s + 60 s
    .venv/bin/python bench/load.py --mode open --rate 60    # only the open loop

Writes ``bench/results/load-cpu.{md,json}`` (``--out`` to change). Redis database 6 is flushed before
and after (``--redis`` to change).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.service import SPEC, pct  # noqa: E402
from cli.stack import descendants, process_table  # noqa: E402
from server.settings import Settings  # noqa: E402
from worker.main import free_port, ray_env, start_local_ray, stop_local_ray  # noqa: E402

KINDS = ("submit", "job", "jobs", "results")
READS = ("job", "jobs", "results")
DEFAULT_MIX = {"submit": 10.0, "job": 40.0, "jobs": 20.0, "results": 30.0}
READ_P99_TARGET_MS = 200.0
DEFAULT_DURATION_S = {"closed": 30.0, "open": 60.0}
"""How long each run lasts unless ``--duration-s`` says (for both)."""
BETWEEN_RUNS_S = 5.0
TEAM = "load"


# -- the load -----------------------------------------------------------------------------------
def parse_mix(text: str) -> dict[str, float]:
    """``submit=10,job=40,jobs=20,results=30`` as weights by kind (they need not add up to 100)."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, weight = part.partition("=")
        if not sep or kind.strip() not in KINDS:
            raise ValueError(f"--mix: {part!r} must look like KIND=WEIGHT with KIND one of {', '.join(KINDS)}")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"--mix: weight of {kind!r} must be a number (got {weight!r})") from None
        if value < 0 or value != value:
            raise ValueError(f"--mix: weight of {kind!r} must be 0 or more (got {weight!r})")
        mix[kind.strip()] = value
    if not any(mix.values()):
        raise ValueError(f"--mix: give at least one kind a weight above 0 (got {text!r})")
    return mix


def _request(kind: str, rng: random.Random, job_ids: list[str], spec: dict[str, Any]) -> tuple[str, str, Any]:
    if kind == "submit":
        return "POST", "/v1/jobs", {"spec": spec}
    if kind == "job":
        return "GET", f"/v1/jobs/{rng.choice(job_ids)}", None
    if kind == "jobs":
        return "GET", "/v1/jobs?limit=50", None
    return "GET", "/v1/results", None


async def _send(
    client: httpx.AsyncClient,
    kind: str,
    request: tuple[str, str, Any],
    started: float,
    samples: dict[str, list[tuple[int | str, float]]],
    failures: list[dict[str, Any]],
    ids: list[str],
) -> None:
    """Send one request and record its status and its latency in ms from ``started`` (a
    ``time.perf_counter()`` value: the send time in a closed loop, the scheduled one in an open loop)."""
    method, url, body = request
    response = None
    try:
        response = await client.request(method, url, json=body)
        code: int | str = response.status_code
    except httpx.HTTPError as exc:
        code = type(exc).__name__
    ms = (time.perf_counter() - started) * 1000
    samples.setdefault(kind, []).append((code, ms))
    if response is not None and code == 201 and kind == "submit":
        ids.append(response.json()["id"])
    elif _is_error(code) and len(failures) < 10:
        text = response.text[:300] if response is not None else ""
        failures.append({"kind": kind, "request": f"{method} {url}", "status": code, "body": text})


async def drive(
    client: httpx.AsyncClient,
    *,
    mix: dict[str, float],
    duration_s: float,
    concurrency: int = 8,
    rate: float | None = None,
    max_in_flight: int = 64,
    max_requests: int | None = None,
    spec: dict[str, Any] | None = None,
    job_ids: list[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Send requests drawn from ``mix`` over ``client`` until ``duration_s`` has passed or
    ``max_requests`` were drawn; return :func:`summarise`'s report with ``mode`` and ``failures``.

    Without ``rate``, a closed loop: ``concurrency`` clients, each sending its next request when the
    last one is answered; latency counts from the send. With ``rate``, an open loop: requests arrive
    at ``rate`` per second on average (Poisson, from ``seed``) whatever the answers do, at most
    ``max_in_flight`` at once; an arrival that finds them all in flight is not sent and is counted in
    ``offered.dropped_by_client`` (``max_requests`` then bounds arrivals, dropped ones included).
    Latency counts from the scheduled arrival, so a late send (a busy client) counts too.

    ``job_ids`` are the jobs ``job`` polls at the start; every job a ``submit`` creates joins them.
    While none is known, a ``job`` draw sends ``GET /v1/jobs`` instead (counted as ``jobs``)."""
    if concurrency < 1 or duration_s <= 0:
        raise ValueError(f"concurrency must be 1 or more and duration_s above 0 (got {concurrency}, {duration_s})")
    if rate is not None and not (0 < rate < math.inf and max_in_flight >= 1):
        raise ValueError(f"rate must be above 0 and max_in_flight 1 or more (got {rate}, {max_in_flight})")
    kinds = [k for k in KINDS if mix.get(k, 0) > 0]
    weights = [mix[k] for k in kinds]
    rng = random.Random(seed)  # the kinds: the same sequence for a seed whatever the answers
    pick = random.Random(f"{seed}:jobs")  # which job a `job` request polls
    ids = list(job_ids or [])
    samples: dict[str, list[tuple[int | str, float]]] = {k: [] for k in kinds}
    failures: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    stop = t0 + duration_s

    def draw() -> tuple[str, tuple[str, str, Any]]:
        kind = rng.choices(kinds, weights)[0]
        if kind == "job" and not ids:
            kind = "jobs"
        return kind, _request(kind, pick, ids, spec or SPEC)

    if rate is None:
        sent = 0

        async def one_client() -> None:
            nonlocal sent
            while time.perf_counter() < stop and (max_requests is None or sent < max_requests):
                sent += 1
                kind, request = draw()
                await _send(client, kind, request, time.perf_counter(), samples, failures, ids)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        report = {"mode": "closed", "concurrency": concurrency, **summarise(samples, time.perf_counter() - t0)}
    else:
        offered = await _open_loop(
            client, draw, rate, max_in_flight, t0, stop, max_requests, seed, samples, failures, ids
        )
        report = {"mode": "open", "offered": offered, **summarise(samples, time.perf_counter() - t0)}
    report["failures"] = failures
    report["jobs_submitted"] = len(ids) - len(job_ids or [])
    return report


async def _open_loop(
    client: httpx.AsyncClient,
    draw: Any,
    rate: float,
    max_in_flight: int,
    t0: float,
    stop: float,
    max_requests: int | None,
    seed: int,
    samples: dict[str, list[tuple[int | str, float]]],
    failures: list[dict[str, Any]],
    ids: list[str],
) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` from ``t0`` to ``stop``: each one drawn, then sent as a task of
    its own, or dropped when ``max_in_flight`` are in flight; waits for every answer. Returns what
    was offered: arrivals, sent, dropped (by kind) and how late the sends were after their schedule."""
    gaps = random.Random(f"{seed}:arrivals")  # the schedule does not depend on the answers
    tasks: set[asyncio.Task[None]] = set()
    dropped: dict[str, int] = {}
    lags: list[float] = []
    in_flight = peak = arrivals = 0

    async def one(kind: str, request: tuple[str, str, Any], scheduled: float) -> None:
        nonlocal in_flight
        lags.append((time.perf_counter() - scheduled) * 1000)
        try:
            await _send(client, kind, request, scheduled, samples, failures, ids)
        finally:
            in_flight -= 1

    due = t0 + gaps.expovariate(rate)
    while due < stop and (max_requests is None or arrivals < max_requests):
        await asyncio.sleep(max(0.0, due - time.perf_counter()))  # yields even when behind schedule
        arrivals += 1
        kind, request = draw()
        if in_flight >= max_in_flight:
            dropped[kind] = dropped.get(kind, 0) + 1
        else:
            in_flight += 1
            peak = max(peak, in_flight)
            task = asyncio.create_task(one(kind, request, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        due += gaps.expovariate(rate)
    window = (stop if due >= stop else time.perf_counter()) - t0  # the time arrivals were offered over
    if tasks:
        await asyncio.gather(*tasks)
    return {
        "rate": rate,
        "max_in_flight": max_in_flight,
        "arrivals": arrivals,
        "offered_rps": arrivals / window if window > 0 else 0.0,
        "sent": arrivals - sum(dropped.values()),
        "dropped_by_client": sum(dropped.values()),
        "dropped_by_kind": dict(sorted(dropped.items())),
        "peak_in_flight": peak,
        "send_lag_p99_ms": pct(lags, 99) if lags else None,
        "send_lag_max_ms": max(lags) if lags else None,
    }


def _is_error(code: int | str) -> bool:
    return not (isinstance(code, int) and (200 <= code < 300 or code == 429))


def _stats(rows: list[tuple[int | str, float]], wall_s: float) -> dict[str, Any]:
    ms = [m for _, m in rows]
    codes: dict[str, int] = {}
    for code, _ in rows:
        codes[str(code)] = codes.get(str(code), 0) + 1
    return {
        "count": len(rows),
        "rps": len(rows) / wall_s if wall_s > 0 else 0.0,
        "p50_ms": pct(ms, 50) if ms else None,
        "p90_ms": pct(ms, 90) if ms else None,
        "p99_ms": pct(ms, 99) if ms else None,
        "max_ms": max(ms) if ms else None,
        "errors": sum(_is_error(c) for c, _ in rows),
        "limited_429": sum(c == 429 for c, _ in rows),
        "status": dict(sorted(codes.items())),
    }


def summarise(samples: dict[str, list[tuple[int | str, float]]], wall_s: float) -> dict[str, Any]:
    """Per kind, all reads together and everything: count, requests/s, p50/p90/p99/max latency (ms),
    errors (neither 2xx nor 429, or no answer), 429 answers and the count of each status."""
    reads = [row for k in READS for row in samples.get(k, [])]
    every = [row for rows in samples.values() for row in rows]
    return {
        "seconds": wall_s,
        "kinds": {k: _stats(rows, wall_s) for k, rows in samples.items()},
        "reads": _stats(reads, wall_s),
        "total": _stats(every, wall_s),
    }


# -- the stack ----------------------------------------------------------------------------------
def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], *, signals: int = 1, grace_s: float = 15) -> None:
    """SIGTERM to the process group (twice for an RQ worker: the second stops its running job), then
    SIGKILL to the group and to any child that left it (an RQ work horse)."""
    if proc.poll() is not None:
        return
    family = descendants(proc.pid)
    for i in range(signals):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        if i + 1 < signals:
            time.sleep(1)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait(check: Any, what: str, timeout_s: float, proc: subprocess.Popen[bytes] | None, log: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what}: the process exited with {proc.returncode}; see {log}")
        time.sleep(0.3)
    raise SystemExit(f"{what}: not done within {timeout_s:.0f} s; see {log}")


class TreeCpu:
    """CPU seconds that process trees use during a run, by part (``roots``: part -> root pids; the
    processes of part ``alone`` without their descendants).

    Every process of the trees is sampled every ``every_s`` seconds; a process counts what it used
    after the first sample (or all it used, when it started during the run) up to the last sample that
    saw it. Processes that end during the run count too: summing the trees' ``cutime`` at both ends
    missed them, because Ray reaps its worker processes without adding their time to its own (an
    earlier report showed 45-80 CPU-s of "other work" that was the jobs' training). A process that
    ends loses at most ``every_s`` of its time.
    """

    def __init__(self, roots: dict[str, list[int]], alone: str | None = None, every_s: float = 0.5) -> None:
        self.roots, self.alone, self.every_s = roots, alone, every_s
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-cpu", daemon=True)
        self._sample(initial=True)

    def _sample(self, initial: bool = False) -> None:
        table, tick = process_table(), os.sysconf("SC_CLK_TCK")  # one pass over /proc per sample
        for part, roots in self.roots.items():
            tree = roots if part == self.alone else [p for root in roots for p in (root, *descendants(root, table))]
            for pid in tree:
                if pid not in table:
                    continue
                used = (int(table[pid][11]) + int(table[pid][12])) / tick
                self.first.setdefault(pid, used if initial else 0.0)
                self.last[pid] = (self.last.get(pid, (part,))[0], used)  # a process counts in one part

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> TreeCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def used(self) -> dict[str, float]:
        out = dict.fromkeys(self.roots, 0.0)
        for pid, (part, used) in self.last.items():
            out[part] += used - self.first[pid]
        return out


def _busy_seconds() -> float:
    """CPU time the whole machine spent busy since boot (all cores, /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def run_stack(args: argparse.Namespace) -> dict[str, Any]:
    """Start the stack, apply the load, stop the stack; the report as a dict."""
    from redis import Redis

    redis = Redis.from_url(args.redis)
    redis.flushdb()
    home = Path(tempfile.mkdtemp(prefix="inco-load-"))
    logs = home / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INCO_", "RAY_"))}
    env.update(
        INCO_HOME=str(home),
        INCO_REDIS_URL=args.redis,
        INCO_DATA_ROOT=str(args.data.resolve().parent),
        INCO_MAX_ACTIVE_JOBS="100000",
        INCO_CPUS_PER_WORKER=str(os.cpu_count() or 1),
        INCO_WORKER_NICE=str(args.worker_nice),
    )
    inco = [sys.executable, "-m", "cli.main"]
    made = subprocess.run(
        [*inco, *f"admin token create --team {TEAM} --name bench/load.py --scope read --scope submit".split()],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    found = re.search(r"inco_[A-Za-z0-9_-]{20,}", made.stdout)
    if made.returncode or found is None:
        raise SystemExit(f"inco admin token create failed ({made.returncode}): {made.stdout}{made.stderr}")
    token = found.group(0)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    ray_proc = None
    finished = False
    try:
        api = _spawn([*inco, "serve", "--port", str(port)], env, logs / "api.log")
        procs.append(api)

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, "the API", 60, api, logs / "api.log")
        if args.workers:
            ray_proc, address = start_local_ray(home, nice=args.worker_nice)
            worker_env = {**env, **ray_env(home), "RAY_ADDRESS": address}
            for i in range(args.workers):
                procs.append(_spawn([*inco, "worker", "--name", f"load-{i}"], worker_env, logs / f"worker-{i}.log"))
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
            r = c.post("/v1/datasets", json={"name": "default", "path": args.data.resolve().name})
            if r.status_code != 201:
                raise SystemExit(f"POST /v1/datasets answered {r.status_code}: {r.text}")
            dataset = r.json()
            r = c.post("/v1/jobs", json={"spec": SPEC})
            if r.status_code != 201:
                raise SystemExit(f"POST /v1/jobs answered {r.status_code}: {r.text}")
            first = r.json()["id"]
            if args.workers:  # a worker takes jobs before the load starts
                _wait(
                    lambda: c.get(f"/v1/jobs/{first}").json()["status"] != "queued",
                    "a worker taking the first job",
                    180,
                    procs[1],
                    logs / "worker-0.log",
                )

        job_procs = [*procs[1:], *([ray_proc] if ray_proc else [])]
        runs: dict[str, dict[str, Any]] = {}
        for i, mode in enumerate(modes(args)):
            if i:
                time.sleep(BETWEEN_RUNS_S)  # let the answers of the last run drain
            runs[mode] = _measured_run(args, mode, base, headers, first, api, job_procs)
        with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
            states = {
                s: len(c.get("/v1/jobs", params={"status": s, "limit": 1000}).json())
                for s in ("queued", "running", "succeeded", "failed", "canceled")
            }
        finished = True
    finally:
        for proc in reversed(procs):
            _stop(proc, signals=1 if proc is procs[0] else 2, grace_s=10 if proc is procs[0] else 30)
        if ray_proc is not None:
            stop_local_ray(ray_proc)
        redis.flushdb()
        if finished and not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"kept {home} (the store and the logs)", file=sys.stderr)
    return {
        "runs": runs,
        "jobs_by_status_after": states,
        "dataset": {"name": dataset["name"], "images": dataset["images"], "path": str(args.data)},
    }


def modes(args: argparse.Namespace) -> list[str]:
    """The runs ``--mode`` asks for, in order: the closed loop (saturation) first."""
    return {"both": ["closed", "open"], "closed": ["closed"], "open": ["open"]}[args.mode]


def _measured_run(
    args: argparse.Namespace,
    mode: str,
    base: str,
    headers: dict[str, str],
    first: str,
    api: subprocess.Popen[bytes],
    job_procs: list[subprocess.Popen[bytes]],
) -> dict[str, Any]:
    """One run of :func:`drive` against the API at ``base``, with the CPU each part of the stack used."""
    duration_s = args.duration_s or DEFAULT_DURATION_S[mode]
    load_before = os.getloadavg()
    roots = {"api": [api.pid], "jobs": [p.pid for p in job_procs], "load": [os.getpid()]}
    sampler, busy0 = TreeCpu(roots, alone="load"), _busy_seconds()

    async def go() -> dict[str, Any]:
        pool = args.concurrency if mode == "closed" else args.max_in_flight
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30, limits=limits) as client:
            return await drive(
                client,
                mix=args.mix,
                duration_s=duration_s,
                concurrency=args.concurrency,
                rate=args.rate if mode == "open" else None,
                max_in_flight=args.max_in_flight,
                max_requests=args.requests,
                job_ids=[first],
                seed=args.seed,
            )

    with sampler:
        report = asyncio.run(go())
    cpu, busy = sampler.used(), _busy_seconds() - busy0
    return {
        **report,
        "duration_s": duration_s,
        "max_requests": args.requests,
        "targets": targets(report),
        "cpu": {
            "load_avg_before": list(load_before),
            "load_avg_after": list(os.getloadavg()),
            "busy_cpu_s": busy,
            "api_cpu_s": cpu["api"],
            "api_cpu_ms_per_request": cpu["api"] * 1000 / max(1, report["total"]["count"]),
            "jobs_cpu_s": cpu["jobs"],
            "load_generator_cpu_s": cpu["load"],
            "other_cpu_s": max(0.0, busy - sum(cpu.values())),
            "cores": os.cpu_count(),
        },
    }


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """Zero errors (and, in an open loop, no arrival dropped by the client); p99 of every read kind
    under :data:`READ_P99_TARGET_MS`."""
    read_p99 = [report["kinds"][k]["p99_ms"] for k in READS if report["kinds"].get(k, {}).get("p99_ms") is not None]
    return {
        "zero_errors": report["total"]["errors"] == 0,
        "none_dropped": report.get("offered", {}).get("dropped_by_client", 0) == 0,
        "reads_p99_under_200ms": bool(read_p99) and all(p < READ_P99_TARGET_MS for p in read_p99),
        "worst_read_p99_ms": max(read_p99, default=None),
    }


# -- the report ---------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


ROUTES = {
    "submit": "`POST /v1/jobs`",
    "job": "`GET /v1/jobs/{id}`",
    "jobs": "`GET /v1/jobs?limit=50`",
    "results": "`GET /v1/results`",
}


def _table(run: dict[str, Any]) -> str:
    rows = [
        "| request | count | requests/s | p50 | p90 | p99 | max | errors | 429 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, st in [*run["kinds"].items(), ("reads", run["reads"]), ("total", run["total"])]:
        rows.append(
            f"| {ROUTES.get(kind, f'**{kind}**')} | {st['count']} | {st['rps']:.1f} | {_ms(st['p50_ms'])} | "
            f"{_ms(st['p90_ms'])} | {_ms(st['p99_ms'])} | {_ms(st['max_ms'])} | {st['errors']} | {st['limited_429']} |"
        )
    return "\n".join(rows)


def _met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _run_section(mode: str, run: dict[str, Any]) -> str:
    """The markdown of one run: how the load was made, the latency table, the targets, the failures."""
    t, total = run["targets"], run["total"]
    if mode == "open":
        o = run["offered"]
        how = (
            f"Requests arrived at {o['rate']:g} per second on average (Poisson, seeded), whatever the answers "
            f"did, at most {o['max_in_flight']} in flight; {o['arrivals']} arrived ({o['offered_rps']:.1f}/s), "
            f"{o['sent']} were sent and **{o['dropped_by_client']} dropped by the client** (arrivals that "
            f"found all {o['max_in_flight']} allowed requests in flight)"
            + (f" ({', '.join(f'{k}: {n}' for k, n in o['dropped_by_kind'].items())})" if o["dropped_by_kind"] else "")
            + f". At most {o['peak_in_flight']} were in flight at once. Latency in ms counts from the scheduled "
            f"arrival to the whole answer, so a send the client made late counts too (sends were at most "
            f"{_ms(o['send_lag_max_ms'])} ms late, p99 {_ms(o['send_lag_p99_ms'])} ms)."
        )
        goal = (
            f"Targets: zero errors: {_met(t['zero_errors'])} ({total['errors']} errors); no arrival dropped: "
            f"{_met(t['none_dropped'])}; p99 of every read under {READ_P99_TARGET_MS:.0f} ms: "
            f"{_met(t['reads_p99_under_200ms'])} (worst read p99 {_ms(t['worst_read_p99_ms'])} ms)."
        )
    else:
        c, rps = run["concurrency"], total["rps"]
        how = (
            f"{c} client{'s' if c != 1 else ''}, each sending its next request as soon as the last one was "
            "answered, so the "
            f"service is kept saturated: the throughput is what it can serve, and the latency is mostly "
            f"queueing, about {c} / {rps:.1f} requests/s = {c / rps * 1000 if rps else 0:.0f} ms on average "
            "(Little's law). Latency in ms counts from the send to the whole answer."
        )
        goal = (
            f"Saturation throughput: **{rps:.1f} requests/s** ({total['errors']} errors). The latency targets are "
            "not judged here (a saturated closed loop has the latency its client count sets)."
        )
    failures = "\n".join(
        f"- {f['kind']} `{f['request']}` -> {f['status']}: `{f['body'][:200]}`" for f in run["failures"]
    )
    title = (
        f"Open loop, {run['offered']['rate']:g} requests/s offered (the targets)"
        if mode == "open"
        else f"Closed loop, {run['concurrency']} client{'s' if run['concurrency'] != 1 else ''} (saturation)"
    )
    return f"""## {title}: {run["seconds"]:.1f} s, {total["count"]} requests

{how}

{_table(run)}

{goal}

{("Errors (first ones):" + chr(10) + failures) if failures else "No request failed."}
{run["jobs_submitted"]} jobs were submitted during this run.
"""


def _cpu_section(runs: dict[str, dict[str, Any]]) -> str:
    names = {"closed": "closed loop", "open": "open loop"}
    head = "| | " + " | ".join(names[m] for m in runs) + " |\n|---|" + "---|" * len(runs)

    def row(label: str, cell: Any) -> str:
        return f"| {label} | " + " | ".join(cell(r) for r in runs.values()) + " |"

    rows = [
        row("load average before (1, 5, 15 min)", lambda r: ", ".join(f"{v:.2f}" for v in r["cpu"]["load_avg_before"])),
        row("load average after", lambda r: ", ".join(f"{v:.2f}" for v in r["cpu"]["load_avg_after"])),
        row(
            "machine busy (CPU-s of the CPU-s there were)",
            lambda r: f"{r['cpu']['busy_cpu_s']:.0f} of {r['cpu']['cores'] * r['seconds']:.0f}",
        ),
        row(
            "the API (one uvicorn process)",
            lambda r: (
                f"{r['cpu']['api_cpu_s']:.1f} ({r['cpu']['api_cpu_ms_per_request']:.1f} ms per request, "
                f"{r['cpu']['api_cpu_s'] / r['seconds']:.2f} of a core)"
            ),
        ),
        row("the workers, Ray and the jobs' training", lambda r: f"{r['cpu']['jobs_cpu_s']:.1f}"),
        row("the load generator (this script)", lambda r: f"{r['cpu']['load_generator_cpu_s']:.1f}"),
        row("other work on the machine (not the processes above)", lambda r: f"{r['cpu']['other_cpu_s']:.1f}"),
    ]
    return head + "\n" + "\n".join(rows)


def write_report(summary: dict[str, Any], out: Path) -> None:
    """``out``.json (the summary) and ``out``.md (the open-loop run first, then the saturation run)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    runs = {m: summary["runs"][m] for m in ("open", "closed") if m in summary["runs"]}
    cores = next(iter(runs.values()))["cpu"]["cores"]
    out.with_suffix(".md").write_text(
        f"""# Load benchmark ({summary["date"]})

Machine: {summary["machine"]}, no GPU. Code: {summary["commit"]}.

Command: `{summary["command"]}`

One API process (`inco serve`, uvicorn), SQLite store, Redis on loopback, a local Ray head and
{summary["workers"]} worker(s) running the submitted smoke jobs (`{json.dumps(summary["spec"])}`), all on
the same {cores} cores as the load generator (asyncio, httpx, keep-alive connections). The workers and
the Ray head ran at CPU priority nice {summary.get("worker_nice", 0)} (INCO_WORKER_NICE), the API at nice 0.
INCO_MAX_ACTIVE_JOBS was 100000 so the per-team limit did not refuse submits; a 429 would be counted
apart, not as an error. Mix (weights): {", ".join(f"{k}={v:g}" for k, v in summary["mix"].items())}.
Data set: NEU-CLS, {summary["dataset"]["images"]} images, registered with `POST /v1/datasets`.
{"The runs were made one after the other on the same service, the saturation run first." if len(runs) > 1 else ""}

{chr(10).join(_run_section(m, r) for m, r in runs.items())}
Jobs after the runs: {", ".join(f"{n} {s}" for s, n in summary["jobs_by_status_after"].items())}.

## The CPU was shared

CPU-seconds used during each run:

{_cpu_section(runs)}
"""
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; refuses bad values with a message naming the option."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report-from", type=Path, help="only write the markdown report again from this JSON")
    ap.add_argument(
        "--mode",
        choices=("both", "closed", "open"),
        default="both",
        help="closed loop (saturation), open loop (--rate), or both one after the other (default)",
    )
    ap.add_argument(
        "--duration-s", type=float, default=None, help="how long each run lasts (default: closed 30, open 60)"
    )
    ap.add_argument("--requests", type=int, default=None, help="stop each run after this many requests (arrivals)")
    ap.add_argument("--concurrency", type=int, default=8, help="closed loop: concurrent clients")
    ap.add_argument("--rate", type=float, default=40.0, help="open loop: requests per second offered (Poisson)")
    ap.add_argument("--max-in-flight", type=int, default=64, help="open loop: arrivals past this many are dropped")
    ap.add_argument("--workers", type=int, default=1, help="`inco worker` processes running the jobs (0: none)")
    ap.add_argument(
        "--worker-nice",
        type=int,
        default=Settings().worker_nice,
        help="CPU priority (nice) of the workers and the Ray head, as INCO_WORKER_NICE (default: the service's)",
    )
    ap.add_argument("--mix", default="submit=10,job=40,jobs=20,results=30", help="KIND=WEIGHT,...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "neu-cls")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/6", help="a Redis database of its own (flushed)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load-cpu")
    ap.add_argument("--keep-home", action="store_true", help="keep the temporary INCO_HOME (logs, store)")
    args = ap.parse_args(argv)
    if args.report_from is not None:
        return args
    try:
        args.mix = parse_mix(args.mix)
    except ValueError as exc:
        ap.error(str(exc))
    if (args.duration_s is not None and not args.duration_s > 0) or (args.requests is not None and args.requests < 1):
        ap.error("--duration-s must be above 0 and --requests 1 or more")
    if not 0 <= args.worker_nice <= 19:
        ap.error(f"--worker-nice must be 0 to 19 (got {args.worker_nice})")
    if args.concurrency < 1 or args.max_in_flight < 1 or args.workers < 0:
        ap.error("--concurrency and --max-in-flight must be 1 or more, --workers 0 or more")
    if not 0 < args.rate < math.inf:
        ap.error(f"--rate must be above 0 requests per second (got {args.rate:g})")
    if not args.data.is_dir():
        ap.error(f"--data: no folder {args.data}; point it at the NEU-CLS images")
    return args


def main() -> None:
    args = parse_args()
    if args.report_from is not None:
        write_report(json.loads(args.report_from.read_text()), args.out)
        return
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = run_stack(args)
    summary = {
        "date": date,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "commit": _git_commit(),
        "command": " ".join([".venv/bin/python bench/load.py", *sys.argv[1:]]),
        "mix": args.mix,
        "workers": args.workers,
        "worker_nice": args.worker_nice,
        "spec": SPEC,
        **report,
    }
    write_report(summary, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
