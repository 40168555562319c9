"""The service commands (``inco submit``, ``jobs``, ``wait``, ``results``, ...) as a user types them,
in subprocesses, against a real API server (uvicorn, Redis, SQLite). No worker runs, so jobs stay queued."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from worker.main import free_port

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/14"
pytestmark = pytest.mark.integration


@dataclass
class Api:
    url: str
    token: str
    home: Path
    db_url: str


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("INCO_")}


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the API exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the API did not get ready within 60 s:\n{log.read_text()}")


def _make_token(db_url: str) -> str:
    from server.store import access
    from server.store.db import make_engine, session_scope

    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            return access.create_token(s, team=access.ensure_team(s, name="cli"))
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def api(neu_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    try:
        redis.Redis.from_url(REDIS_URL).flushdb()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {REDIS_URL} does not answer ({exc}); start redis-server")
    home = tmp_path_factory.mktemp("inco-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**_clean_env(), "INCO_HOME": str(home), "INCO_REDIS_URL": REDIS_URL, "INCO_DATA_ROOT": str(neu_path.parent)}
    log = home / "api.log"
    command = [sys.executable, "-m", "uvicorn", "--factory", "server.api.app:app", "--host", "127.0.0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(url, proc, log)
        db_url = f"sqlite:///{home / 'inco.db'}"
        server = Api(url=url, token=_make_token(db_url), home=home, db_url=db_url)
        added = _inco(server, "datasets", "add", "default", neu_path.name)
        assert added.returncode == 0, added.stderr
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run(args: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO,
        env={**_clean_env(), "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _inco(api: Api, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(args, {"INCO_HOME": str(api.home), "INCO_API_URL": api.url, "INCO_TOKEN": api.token})


def _submit(api: Api, *args: str) -> str:
    proc = _inco(api, "submit", "--preset", "smoke", *args)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id), proc.stdout
    return job_id


def _one_error_line(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), proc.stderr
    return lines[-1]


# -- data sets, submit, jobs, status ---------------------------------------------------------------
def test_datasets_lists_the_registered_folder(api: Api) -> None:
    table = _inco(api, "datasets")
    assert table.returncode == 0, table.stderr
    assert "default" in table.stdout and "1800" in table.stdout and "crazing" in table.stdout
    (ds,) = json.loads(_inco(api, "datasets", "--json").stdout)
    assert ds["name"] == "default" and ds["images"] == 1800 and len(ds["classes"]) == 6
    again = _one_error_line(_inco(api, "datasets", "add", "default", "neu-cls"))
    assert "exists already" in again


def test_submit_prints_the_id_and_the_job_is_listed(api: Api) -> None:
    job_id = _submit(api, "--ratio", "1:32", "--ratio", "1:8", "--seed", "3", "--set", "pretrain.epochs=1")
    jobs = _inco(api, "jobs")
    assert jobs.returncode == 0, jobs.stderr
    (line,) = [ln for ln in jobs.stdout.splitlines() if job_id in ln]
    assert "experiment" in line and "inco" in line and "1:32, 1:8" in line and "smoke" in line and "queued" in line
    listed = {j["id"]: j for j in json.loads(_inco(api, "jobs", "--json", "--status", "queued").stdout)}
    assert listed[job_id]["spec"]["seeds"] == [3]
    assert listed[job_id]["spec"]["overrides"] == {"pretrain.epochs": 1}
    status = _inco(api, "status", job_id)
    assert status.returncode == 0, status.stderr
    assert job_id in status.stdout and "queued" in status.stdout and "1:32, 1:8" in status.stdout
    detail = json.loads(_inco(api, "status", job_id, "--json").stdout)
    assert detail["job"]["status"] == "queued" and detail["metrics"] == []


def test_submit_json_prints_the_job(api: Api) -> None:
    proc = _inco(api, "submit", "--preset", "smoke", "--eval", "both", "--json")
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)
    assert job["status"] == "queued" and job["spec"]["evals"] == ["finetune", "linear"]
    assert job["spec"]["data"]["dataset"] == "default"


# -- wait, cancel, logs ----------------------------------------------------------------------------
def test_wait_on_a_queued_job_times_out_with_exit_2(api: Api) -> None:
    job_id = _submit(api)
    start = time.monotonic()
    line = _one_error_line(_inco(api, "wait", job_id, "--timeout", "2"), code=2)
    assert time.monotonic() - start < 30
    assert f"job {job_id} is still queued after 2 s" in line


def test_submit_wait_follows_the_job(api: Api) -> None:
    proc = _inco(api, "submit", "--preset", "smoke", "--wait", "--timeout", "1")
    line = _one_error_line(proc, code=2)
    job_id = proc.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id), proc.stdout
    assert f"job {job_id}: queued (waiting for a worker" in proc.stderr
    assert f"job {job_id} is still queued after 1 s" in line


def test_cancel_then_wait_logs_and_cancel_again(api: Api) -> None:
    job_id = _submit(api)
    canceled = _inco(api, "cancel", job_id)
    assert canceled.returncode == 0, canceled.stderr
    assert f"job {job_id}: canceled" in canceled.stdout
    again = _one_error_line(_inco(api, "cancel", job_id))
    assert f"job {job_id} already ended canceled" in again
    waited = _one_error_line(_inco(api, "wait", job_id))
    assert waited == f"Error: job {job_id} was canceled: canceled before it started"
    as_json = _inco(api, "wait", job_id, "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["job"]["status"] == "canceled"
    for args in (("logs", job_id), ("logs", job_id, "--follow")):
        logs = _inco(api, *args)
        assert logs.returncode == 0, logs.stderr
        lines = logs.stdout.strip().splitlines()
        assert len(lines) == 2, logs.stdout
        assert lines[0].endswith("info    queued: experiment of inco")
        assert lines[1].endswith("info    canceled: canceled before it started")
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", lines[0])


# -- results ---------------------------------------------------------------------------------------
def _store_finished_job(api: Api) -> str:
    """A succeeded job with 3 seeds at 1:2 and 1:16, and two epochs of metrics, written to the store."""
    from sqlmodel import select

    from server.store.db import make_engine, session_scope
    from server.store.models import Job, JobStatus, Metric, Result, Team

    engine = make_engine(api.db_url)
    accuracies = {"1:16": [0.90, 0.92, 0.94], "1:2": [0.97, 0.98, 0.99]}
    try:
        with session_scope(engine) as s:
            team = s.exec(select(Team).where(Team.name == "cli")).one()
            spec = {
                "method": "inco",
                "ratios": ["1:16", "1:2"],
                "evals": ["finetune"],
                "preset": "smoke",
                "seeds": [0, 1, 2],
            }
            job = Job(team_id=team.id, spec=spec, status=JobStatus.succeeded)
            s.add(job)
            s.flush()
            for epoch, loss in ((1, 2.5), (2, 1.25)):
                s.add(Metric(job_id=job.id, stage="pretrain", epoch=epoch, epochs=2, values={"loss": loss, "knn": 0.5}))
            for ratio, accs in accuracies.items():
                for seed, acc in enumerate(accs):
                    s.add(
                        Result(
                            job_id=job.id,
                            team_id=team.id,
                            dataset="default",
                            preset="smoke",
                            method="inco",
                            variant="InCo with DWV",
                            ratio=ratio,
                            eval="finetune",
                            seed=seed,
                            accuracy=acc,
                            per_class_recall={"crazing": acc, "patches": 1.0},
                            confusion_matrix=[[1, 0], [0, 1]],
                            classes=["crazing", "patches"],
                            labelled_images=40,
                            test_images=720,
                            wall_time_s=12.0,
                            hardware="cpu (test)",
                            code_version="test",
                            data_fingerprint="f" * 16,
                        )
                    )
            return job.id
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def finished_job(api: Api) -> str:
    return _store_finished_job(api)


def test_results_table_json_and_csv(api: Api, finished_job: str) -> None:
    table = _inco(api, "results", "--preset", "smoke")
    assert table.returncode == 0, table.stderr
    assert "default · smoke preset · finetune" in table.stdout
    header = next(ln for ln in table.stdout.splitlines() if "1:16" in ln)
    assert header.index("1:2 ") < header.index("1:16")
    row = next(ln for ln in table.stdout.splitlines() if "InCo with DWV" in ln)
    assert "98.00 ± 1.00 (n=3)" in row and "92.00 ± 2.00 (n=3)" in row
    assert row.index("98.00") < row.index("92.00")

    rows = json.loads(_inco(api, "results", "--format", "json").stdout)
    by_ratio = {r["ratio"]: r for r in rows}
    assert by_ratio["1:16"]["count"] == 3 and by_ratio["1:16"]["seeds"] == [0, 1, 2]
    assert by_ratio["1:16"]["mean"] == pytest.approx(0.92) and by_ratio["1:16"]["std"] == pytest.approx(0.02)

    out = _inco(api, "results", "--format", "csv", "--ratio", "1:16").stdout
    (cell,) = list(csv.DictReader(io.StringIO(out)))
    assert list(cell) == ["dataset", "preset", "setup", "eval", "variant", "method", "ratio", "mean", "std", "count"]
    assert cell["variant"] == "InCo with DWV" and cell["ratio"] == "1:16" and cell["count"] == "3"
    assert float(cell["mean"]) == pytest.approx(0.92)

    bad = _one_error_line(_inco(api, "results", "--format", "xml"))
    assert "--format must be table, json or csv" in bad


def test_wait_and_status_on_a_succeeded_job(api: Api, finished_job: str) -> None:
    waited = _inco(api, "wait", finished_job)
    assert waited.returncode == 0, waited.stderr
    assert "InCo with DWV" in waited.stdout and "92.00%" in waited.stdout and "crazing 90%" in waited.stdout
    assert f"job {finished_job}: succeeded" in waited.stderr and "epoch 2/2" in waited.stderr
    out = json.loads(_inco(api, "wait", finished_job, "--json").stdout)
    assert out["job"]["results"] == 6 and len(out["results"]) == 6
    status = _inco(api, "status", finished_job)
    assert "succeeded" in status.stdout and "2/2" in status.stdout and "loss 1.250" in status.stdout
    (latest,) = json.loads(_inco(api, "status", finished_job, "--json").stdout)["metrics"]
    assert latest["epoch"] == 2 and latest["values"]["loss"] == 1.25


# -- tune -------------------------------------------------------------------------------------------
def test_tune_submits_a_search_and_lists_its_trials_best_first(api: Api) -> None:
    from server.store import access
    from server.store.db import make_engine, session_scope

    proc = _inco(api, "tune", "--ratio", "1:16", "--trials", "3", "--preset", "smoke", "--param", "a_f", "--json")
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)
    assert job["kind"] == "tune" and job["tune"]["trials"] == 3 and job["tune"]["params"] == ["a_f"]
    assert job["spec"]["ratios"] == ["1:16"] and job["spec"]["preset"] == "smoke"
    assert "submitted tune job" in proc.stderr and "3 trials" in proc.stderr
    assert "has no trials yet" in _inco(api, "results", "--tune", job["id"]).stderr

    engine = make_engine(api.db_url)
    try:
        with session_scope(engine) as s:
            for number, status, score, epoch in (
                (1, "completed", 0.5, 1),
                (2, "completed", 0.75, 1),
                (3, "failed", None, 0),
            ):
                access.save_trial(
                    s,
                    job_id=job["id"],
                    number=number,
                    trial_id=f"t{number}",
                    params={"pretrain.inco.a_f": 0.1 * number},
                    epochs=1,
                    status=status,
                    score=score,
                    epoch=epoch,
                    error="TrainingDiverged: loss nan" if status == "failed" else None,
                )
    finally:
        engine.dispose()
    table = _inco(api, "results", "--tune", job["id"])
    assert table.returncode == 0, table.stderr
    lines = [ln for ln in table.stdout.splitlines() if "completed" in ln or "failed" in ln]
    assert "75.00" in lines[0] and "a_f=0.2" in lines[0] and "50.00" in lines[1]
    assert "failed" in lines[2] and "TrainingDiverged" in table.stdout
    rows = list(csv.DictReader(io.StringIO(_inco(api, "results", "--tune", job["id"], "--format", "csv").stdout)))
    assert [r["number"] for r in rows] == ["2", "1", "3"] and rows[0]["rank"] == "1"
    assert json.loads(rows[0]["params"]) == {"pretrain.inco.a_f": 0.2}
    assert [t["number"] for t in json.loads(_inco(api, "results", "--tune", job["id"], "--format", "json").stdout)] == [
        2,
        1,
        3,
    ]
    # the search has not finished: its best trial cannot be submitted yet
    assert f"inco wait {job['id']}" in _one_error_line(_inco(api, "submit", "--from-tune", job["id"]))


# -- finding the API, and errors ---------------------------------------------------------------------
def test_the_local_stack_file_gives_url_and_token(api: Api, tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text(json.dumps({"api_url": api.url, "token": api.token, "pids": {}}))
    proc = _run(("datasets", "--json"), {"INCO_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert [d["name"] for d in json.loads(proc.stdout)] == ["default"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("submit", "--ratio", "16"), "spec.ratios.0: ratio must look like 1:16 (got '16')"),
        (("submit", "--dataset", "nope"), "spec.data.dataset: no data set named 'nope'"),
        (("submit", "--eval", "sometimes"), "--eval must be finetune, linear or both"),
        (("submit", "--set", "novalue"), "--set takes key=value"),
        (("submit", "--pretrained", "0" * 32), f"pretrained_job: no job {'0' * 32!r} in your team"),
        (("status", "f" * 32), f"no job {'f' * 32!r}"),
        (("wait", "../datasets"), "no job '../datasets'"),
        (("results", "--ratio", "1:x"), "ratio"),
        (("tune", "--method", "simclr", "--param", "a_f"), "a_f are InCo's parameters"),
        (("tune", "--param", "tau"), "tune.params.0: must be one of"),
        (("submit", "--from-tune", "0" * 32), f"from_tune: no job {'0' * 32!r} in your team"),
        (("submit", "--from-tune", "x", "--kind", "pretrain"), "--from-tune submits an experiment"),
        (("results", "--tune", "0" * 32), f"no job {'0' * 32!r}"),
    ],
)
def test_bad_input_is_one_clear_line(api: Api, args: tuple[str, ...], message: str) -> None:
    assert message in _one_error_line(_inco(api, *args))


def test_no_token_says_how_to_get_one(api: Api, tmp_path: Path) -> None:
    line = _one_error_line(_run(("jobs",), {"INCO_HOME": str(tmp_path), "INCO_API_URL": api.url}))
    assert "no API token" in line and "set INCO_TOKEN or run `inco up`" in line


def test_a_bad_token_is_refused(api: Api) -> None:
    env = {"INCO_HOME": str(api.home), "INCO_API_URL": api.url, "INCO_TOKEN": "inco_not-a-token"}
    line = _one_error_line(_run(("jobs",), env))
    assert "unknown or revoked token" in line and "set INCO_TOKEN or run `inco up`" in line


def test_an_api_that_is_down_says_cannot_reach(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = _one_error_line(_run(("jobs",), {"INCO_HOME": str(tmp_path), "INCO_API_URL": url, "INCO_TOKEN": "x"}))
    assert f"cannot reach the InCo API at {url}: start it with `inco up` or set INCO_API_URL" in line
