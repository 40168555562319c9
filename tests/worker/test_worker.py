"""Queue + worker end to end: a real `inco worker` process, real Redis, SQLite, a local Ray and the
real NEU-CLS images; jobs are submitted through the API."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.stack import descendants
from server.store import access
from server.store.db import make_engine, session_scope
from tests.worker.conftest import SMOKE
from tests.worker.harness import Service, running_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REDIS_WORKER = os.environ.get("INCO_TEST_REDIS_WORKER", "redis://127.0.0.1:6379/11")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, neu_path: Path, local_ray: dict[str, str]) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("service-home"), neu_path, local_ray, redis_url=REDIS_WORKER) as svc:
        yield svc


def test_experiments_run_and_reuse_the_backbone(service: Service) -> None:
    job_id = service.submit(SMOKE)
    job, seen = service.wait(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert seen[-2:] == ["running", "succeeded"] and job["attempts"] == 1 and job["worker"]
    metrics = service.get(f"/v1/jobs/{job_id}/metrics")
    assert [(m["stage"], m["epoch"]) for m in metrics] == [("pretrain", 1), ("finetune 1:16", 1), ("finetune 1:16", 2)]
    assert {"loss", "bid", "dwv_weight", "knn", "img_per_s"} <= set(metrics[0]["values"])
    rows = service.get(f"/v1/jobs/{job_id}/results")
    assert len(rows) == 1 and rows[0]["ratio"] == "1:16" and 0 <= rows[0]["accuracy"] <= 1
    assert sum(map(sum, rows[0]["confusion_matrix"])) == 720 and len(rows[0]["per_class_recall"]) == 6
    assert rows[0]["dataset"] == "default" and rows[0]["preset"] == "smoke" and rows[0]["code_version"]
    board = service.get("/v1/results?preset=smoke")
    assert [(r["variant"], r["ratio"], r["count"]) for r in board] == [("InCo with DWV", "1:16", 1)]
    assert job["outputs"]["backbones"][0]["reused"] is False

    # same method, pretrain config, data and seed: one pretraining in the store, reused by the second job
    second = service.submit({"spec": {**SMOKE["spec"], "ratios": ["1:8"], "evals": ["linear"]}})
    job2, _ = service.wait(second)
    assert job2["status"] == "succeeded", job2["error"]
    assert [m["stage"] for m in service.get(f"/v1/jobs/{second}/metrics")] == ["linear 1:8", "linear 1:8"]
    assert job2["outputs"]["backbones"] == [{**job["outputs"]["backbones"][0], "reused": True}]
    assert any("reusing backbone" in line["message"] for line in service.get(f"/v1/jobs/{second}/logs"))
    with session_scope(make_engine(service.settings.db_url)) as s:
        backbones = [a for a in access.list_artifacts(s, team_id=1) if a.kind == "backbone"]
    assert len(backbones) == 1 and Path(backbones[0].path).exists()


def test_a_failing_job_ends_failed_with_its_error(service: Service, neu_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    for cls in ("crazing", "scratches"):
        (broken / cls).mkdir(parents=True)
        for src in sorted((neu_path / cls).iterdir())[:20]:
            shutil.copy(src, broken / cls / src.name)
    (broken / "scratches" / "bad.jpg").write_bytes(b"this is not a jpeg")
    with session_scope(make_engine(service.settings.db_url)) as s:  # the admin registers any folder
        access.add_dataset(s, team_id=1, name="broken", path=str(broken), images=41, classes=["crazing", "scratches"])
    job_id = service.submit({"spec": {**SMOKE["spec"], "data": {"dataset": "broken"}}})
    job, _ = service.wait(job_id)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert "bad.jpg" in job["error"] and "cannot read image" in job["error"]
    assert service.get(f"/v1/jobs/{job_id}/logs")[-1]["level"] == "error"


def test_cancel_stops_a_running_job_within_seconds(service: Service) -> None:
    job_id = service.submit({"spec": {**SMOKE["spec"], "overrides": {"pretrain.epochs": 500}}})
    service.wait_for_epochs(job_id, 1)  # training is under way
    t0 = time.monotonic()
    r = service.client.post(f"/v1/jobs/{job_id}/cancel", headers=service.headers)
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    job, _ = service.wait(job_id, timeout_s=60)
    took = time.monotonic() - t0
    assert job["status"] == "canceled" and took < 30, took
    assert len(service.get(f"/v1/jobs/{job_id}/metrics")) < 500


def test_pretrain_then_finetune_is_a_chain(service: Service) -> None:
    spec = {**SMOKE["spec"], "method": "simclr"}
    pre = service.submit({"kind": "pretrain", "spec": spec})
    ft = service.submit({"kind": "finetune", "pretrained_job": pre, "spec": spec})
    assert service.job(ft)["status"] == "queued"
    pre_job, _ = service.wait(pre)
    assert pre_job["status"] == "succeeded", pre_job["error"]
    assert service.get(f"/v1/jobs/{pre}/results") == [] and len(pre_job["outputs"]["backbones"]) == 1
    ft_job, _ = service.wait(ft)
    assert ft_job["status"] == "succeeded", ft_job["error"]
    assert ft_job["started_at"] >= pre_job["finished_at"]
    assert [m["stage"] for m in service.get(f"/v1/jobs/{ft}/metrics")] == ["finetune 1:16"] * 2  # no pretraining
    assert ft_job["outputs"]["backbones"][0]["key"] == pre_job["outputs"]["backbones"][0]["key"]


@pytest.mark.parametrize("method", ["simclr", "mocov2"])  # negatives gathered with gradients / a shared queue
def test_two_ray_workers_pretrain_data_parallel(service: Service, method: str) -> None:
    spec = {
        **SMOKE["spec"],
        "method": method,
        "resources": {"device": "cpu", "workers": 2},
        "overrides": {"pretrain.max_images": 189},  # a backbone of its own; the last batch splits 31 + 30
    }
    job_id = service.submit({"spec": spec})
    job, _ = service.wait(job_id)
    assert job["status"] == "succeeded", job["error"]
    metrics = service.get(f"/v1/jobs/{job_id}/metrics")
    assert [(m["stage"], m["epoch"]) for m in metrics] == [("pretrain", 1), ("finetune 1:16", 1), ("finetune 1:16", 2)]
    assert "knn" in metrics[0]["values"]  # rank 0 monitors, and reports once per epoch
    rows = service.get(f"/v1/jobs/{job_id}/results")
    assert len(rows) == 1 and sum(map(sum, rows[0]["confusion_matrix"])) == 720  # each test image once
    assert any("2 workers" in line["message"] for line in service.get(f"/v1/jobs/{job_id}/logs"))


def test_a_job_larger_than_the_cluster_fails_at_once(service: Service) -> None:
    job_id = service.submit({"spec": {**SMOKE["spec"], "resources": {"device": "cpu", "workers": 64}}})
    job, _ = service.wait(job_id, timeout_s=60)
    assert job["status"] == "failed" and "asks for 64 workers but the Ray cluster has 2 CPU(s)" in job["error"]
    gpu = service.submit({"spec": {**SMOKE["spec"], "resources": {"device": "cuda", "workers": 1}}})
    job, _ = service.wait(gpu, timeout_s=60)
    assert job["status"] == "failed" and "asks for 1 GPU(s) but the Ray cluster has 0" in job["error"]


def _train_workers() -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"RayTrainWorker" in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def test_a_crashed_worker_group_restarts_from_the_last_checkpoint(service: Service) -> None:
    """kill -9 of the Ray Train worker mid-pretraining: the same attempt starts a new worker group,
    which resumes from the last epoch checkpoint; every epoch is stored once."""
    spec = {**SMOKE["spec"], "method": "simsiam", "overrides": {"pretrain.epochs": 20, "pretrain.max_images": 96}}
    job_id = service.submit({"spec": spec})
    service.wait_for_epochs(job_id, 2)
    victims = _train_workers()
    assert victims, "no Ray Train worker process found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    job, _ = service.wait(job_id, timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1  # the queue did not need to run it again
    logs = [line["message"] for line in service.get(f"/v1/jobs/{job_id}/logs")]
    assert any("restart 1/" in m and "from the last checkpoint" in m for m in logs), logs
    epochs = [m["epoch"] for m in service.get(f"/v1/jobs/{job_id}/metrics") if m["stage"] == "pretrain"]
    assert epochs == list(range(1, 21))
    with session_scope(make_engine(service.settings.db_url)) as s:
        art = access.find_artifact(s, team_id=1, kind="backbone", key=job["outputs"]["backbones"][0]["key"])
    import torch

    assert torch.load(art.path, weights_only=True)["meta"]["resumed_at_epoch"] >= 1  # not from epoch 0


def test_a_job_whose_worker_dies_runs_again_and_resumes(service: Service) -> None:
    """kill -9 of the worker (and its work horse) mid-pretraining: a new worker picks the job up once
    its heartbeat has expired, and the new attempt resumes from the last epoch checkpoint."""
    spec = {**SMOKE["spec"], "method": "simsiam", "overrides": {"pretrain.epochs": 30, "pretrain.max_images": 128}}
    job_id = service.submit({"spec": spec})
    service.wait_for_epochs(job_id, 2)
    horse = descendants(service.worker.pid)
    assert horse, "no work horse under the worker"
    for pid in [service.worker.pid, *horse]:  # the machine goes down: worker and work horse
        os.kill(pid, signal.SIGKILL)
    service.worker.wait(10)
    killed_at = len(service.get(f"/v1/jobs/{job_id}/metrics"))
    service.start_worker()
    job, _ = service.wait(job_id, timeout_s=400)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    epochs = [m["epoch"] for m in service.get(f"/v1/jobs/{job_id}/metrics") if m["stage"] == "pretrain"]
    assert epochs == list(range(1, 31))  # every epoch once, none duplicated
    assert len(service.get(f"/v1/jobs/{job_id}/results")) == 1
    with session_scope(make_engine(service.settings.db_url)) as s:
        key = job["outputs"]["backbones"][0]["key"]
        art = access.find_artifact(s, team_id=1, kind="backbone", key=key)
    import torch

    resumed = torch.load(art.path, weights_only=True)["meta"]["resumed_at_epoch"]
    assert resumed is not None and 1 <= resumed <= killed_at + 1
