"""``inco results --plot FILE`` and ``inco plot JOB --out DIR`` as a user types them, in subprocesses,
against a real API server (uvicorn, SQLite) whose store holds a finished experiment (metrics, four result
rows, an untrained backbone for seed 0 on a folder of 18 NEU-CLS images) and a tune job with trials.
The files written are the API's pictures: valid PNG or SVG, named per result row and seed."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli.test_service_cli import REPO, Api, _clean_env, _one_error_line, _run, _wait_ready
from worker.main import free_port

pytestmark = pytest.mark.integration
CLASSES = ("crazing", "inclusion", "patches")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    return struct.unpack(">II", data[16:24])


def _store(db_url: str, data: Path, home: Path) -> dict[str, str]:
    """Team cli's finished experiment and tune job, and a queued job, written to the store."""
    import torch

    from inco_core.checkpoint import save_checkpoint
    from inco_core.config import load_spec
    from inco_core.models import Backbone
    from server.store import access
    from server.store.db import make_engine, migrate, session_scope
    from server.store.models import Artifact, Job, JobKind, JobStatus, Metric

    spec = load_spec(
        {"preset": "smoke", "ratios": ["1:16", "1:2"], "seeds": [0, 1], "data": {"path": str(data)}}
    ).model_dump(mode="json")
    torch.manual_seed(0)
    backbone = save_checkpoint(
        home / "backbone.pt",
        kind="pretrain",
        method="inco",
        state_dict=Backbone().state_dict(),
        config={},
        data_fingerprint="x",
    )
    engine = make_engine(db_url)
    migrate(engine)
    try:
        with session_scope(engine) as s:
            team = access.ensure_team(s, name="cli")
            token = access.create_token(s, team=team, scopes=["read"])
            jobs = {}
            for name, kind, status in (
                ("done", JobKind.experiment, JobStatus.succeeded),
                ("tune", JobKind.tune, JobStatus.succeeded),
                ("queued", JobKind.experiment, JobStatus.queued),
            ):
                job = Job(team_id=team.id, kind=kind, spec=spec, status=status)
                s.add(job)
                s.flush()
                jobs[name] = job
            done = jobs["done"]
            for epoch in (1, 2):
                s.add(Metric(job_id=done.id, stage="pretrain", epoch=epoch, epochs=2, values={"loss": 3.0 - epoch}))
            rows = [
                {
                    "method": "inco",
                    "variant": "InCo with DWV",
                    "ratio": ratio,
                    "eval": "finetune",
                    "seed": seed,
                    "accuracy": acc,
                    "per_class_recall": dict.fromkeys(CLASSES, acc),
                    "confusion_matrix": [[2, 0, 0], [0, 2, 0], [1, 0, 1]],
                    "classes": list(CLASSES),
                    "labelled_images": 4,
                    "test_images": 6,
                    "wall_time_s": 1.0,
                    "pretrain_key": None,
                }
                for ratio, seed, acc in (("1:16", 0, 0.8), ("1:16", 1, 0.7), ("1:2", 0, 0.9), ("1:2", 1, 0.95))
            ]
            result = {
                "results": rows,
                "spec": spec,
                "hardware": "cpu",
                "code_version": "t",
                "data": {"fingerprint": "f"},
            }
            access.add_results(s, job=done, result=result, dataset="default")
            key = "b" * 32
            art = Artifact(
                team_id=team.id,
                job_id=done.id,
                kind="backbone",
                key=key,
                method="inco",
                seed=0,
                path=str(backbone),
                size_bytes=1,
            )
            access.add_artifact(s, artifact=art)
            done.outputs = {"backbones": [{"seed": 0, "key": key, "reused": False}]}
            for number, status, score in ((1, "completed", 0.6), (2, "failed", None)):
                access.save_trial(
                    s,
                    job_id=jobs["tune"].id,
                    number=number,
                    trial_id=f"t{number}",
                    params={"pretrain.inco.a_f": 0.5 * number},
                    epochs=2,
                    status=status,
                    score=score,
                )
            return {"token": token, **{name: job.id for name, job in jobs.items()}}
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def api(neu_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, dict[str, str]]]:
    home = tmp_path_factory.mktemp("plot-cli-home")
    data = home / "data" / "small"
    for cls in CLASSES:
        (data / cls).mkdir(parents=True)
        for i in range(1, 7):
            shutil.copy(neu_path / cls / f"{cls}_{i}.jpg", data / cls)
    db_url = f"sqlite:///{home / 'inco.db'}"
    ids = _store(db_url, data, home)
    port = free_port()
    env = {**_clean_env(), "INCO_HOME": str(home), "INCO_REDIS_URL": "redis://127.0.0.1:6379/14"}
    log = home / "api.log"
    command = [sys.executable, "-m", "uvicorn", "--factory", "server.api.app:app", "--host", "127.0.0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc, log)
        yield Api(url=f"http://127.0.0.1:{port}", token=ids["token"], home=home, db_url=db_url), ids
    finally:
        proc.terminate()
        proc.wait(15)


def _inco(api: Api, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(args, {"INCO_HOME": str(api.home), "INCO_API_URL": api.url, "INCO_TOKEN": api.token})


def test_results_plot_writes_figure_4_of_the_rows_shown(api: tuple[Api, dict], tmp_path: Path) -> None:
    server, _ = api
    png = tmp_path / "figure4.png"
    proc = _inco(server, "results", "--ratio", "1:16", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "InCo with DWV" in proc.stdout and "75.00 ± 7.07 (n=2)" in proc.stdout
    assert f"wrote Figure 4 of 1 row(s) to {png}" in proc.stderr
    assert _png_size(png.read_bytes()) == (900, 600)
    served = httpx.get(
        f"{server.url}/v1/results/figure4.png",
        params={"ratio": "1:16"},
        headers={"Authorization": f"Bearer {server.token}"},
    )
    assert served.content == png.read_bytes()  # what the API draws for the same filters

    svg = tmp_path / "figure4.svg"
    proc = _inco(server, "results", "--format", "json", "--plot", str(svg))
    assert proc.returncode == 0, proc.stderr
    assert [r["ratio"] for r in json.loads(proc.stdout)] == ["1:2", "1:16"]
    assert svg.read_bytes().startswith(b"<?xml") and b"<svg" in svg.read_bytes()


def test_results_plot_errors_are_one_line_with_the_fix(api: tuple[Api, dict], tmp_path: Path) -> None:
    server, ids = api
    bad = _one_error_line(_inco(server, "results", "--plot", str(tmp_path / "figure.jpg")))
    assert "--plot takes a .png or .svg file name" in bad and "--plot figure4.png" in bad
    none = _one_error_line(_inco(server, "results", "--eval", "linear", "--plot", str(tmp_path / "f.png")))
    assert "no results yet, nothing to draw in" in none
    nowhere = _one_error_line(_inco(server, "results", "--plot", str(tmp_path / "missing" / "f.png")))
    assert "cannot write" in nowhere and "folder you can write to" in nowhere
    trials = tmp_path / "trials.png"
    proc = _inco(server, "results", "--tune", ids["tune"], "--plot", str(trials))
    assert proc.returncode == 0 and "wrote the 2 trial(s)" in proc.stderr, proc.stderr
    assert _png_size(trials.read_bytes())[0] == 900


def test_plot_writes_every_picture_of_a_job(api: tuple[Api, dict], tmp_path: Path) -> None:
    server, ids = api
    out = tmp_path / "pictures"
    proc = _inco(server, "plot", ids["done"], "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    names = [
        "curves.png",
        "confusion-1r16-finetune-seed0.png",
        "confusion-1r16-finetune-seed1.png",
        "confusion-1r2-finetune-seed0.png",
        "confusion-1r2-finetune-seed1.png",
        "embedding-seed0.png",
    ]
    assert proc.stdout.splitlines() == [str(out / name) for name in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        width, height = _png_size((out / name).read_bytes())
        assert width == 900 and 400 <= height <= 1200, name
    assert "no embedding map of seed 1: " in proc.stderr and "no backbone for seed 1 yet" in proc.stderr
    assert f"wrote 6 picture(s) of job {ids['done']}" in proc.stderr

    svgs = _inco(server, "plot", ids["tune"], "--out", str(tmp_path / "tune"), "--format", "svg")
    assert svgs.returncode == 0, svgs.stderr
    assert svgs.stdout.splitlines() == [str(tmp_path / "tune" / "trials.svg")]
    assert (tmp_path / "tune" / "trials.svg").read_bytes().startswith(b"<?xml")
    assert f"no training curves: job {ids['tune']} has no metrics yet" in svgs.stderr


def test_plot_errors_are_one_line_with_the_fix(api: tuple[Api, dict], tmp_path: Path) -> None:
    server, ids = api
    assert f"no job {'0' * 32!r}" in _one_error_line(_inco(server, "plot", "0" * 32, "--out", str(tmp_path)))
    queued = _one_error_line(_inco(server, "plot", ids["queued"], "--out", str(tmp_path)))
    assert f"job {ids['queued']} (queued) has nothing to plot yet" in queued and "inco wait" in queued
    (tmp_path / "file").write_text("")
    unwritable = _one_error_line(_inco(server, "plot", ids["done"], "--out", str(tmp_path / "file" / "sub")))
    assert f"cannot write to {tmp_path / 'file' / 'sub'}" in unwritable and "--out" in unwritable
    assert "--format must be png or svg" in _one_error_line(_inco(server, "plot", ids["done"], "--format", "pdf"))
