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
from tests.chaos import pids_running
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
    # each job's classifiers are the team's models: one fine-tuned (1:16), one linear (1:8)
    models = service.get("/v1/models")
    assert sorted((m["job_id"], m["ratio"], m["eval"]) for m in models) == sorted(
        [(job_id, "1:16", "finetune"), (second, "1:8", "linear")]
    )
    assert all(m["calibration_images"] > 0 and m["image_size"] == 32 for m in models)


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


def test_pretrain_then_finetune_is_a_chain_on_two_data_parallel_workers(service: Service) -> None:
    """A pretrain job, then a finetune job that waits for it and uses its backbone, both on two Ray
    Train workers: SimCLR's negatives gathered with gradients across the ranks, rank 0 monitoring,
    and every test image evaluated once. (The gathers themselves, MoCo's queue included, are checked
    against one process in tests/inco_core/test_distributed.py.)"""
    spec = {
        **SMOKE["spec"],
        "method": "simclr",
        "resources": {"device": "cpu", "workers": 2},
        "overrides": {"pretrain.max_images": 189},  # a backbone of its own; the last batch splits 31 + 30
    }
    pre = service.submit({"kind": "pretrain", "spec": spec})
    ft = service.submit({"kind": "finetune", "pretrained_job": pre, "spec": spec})
    assert service.job(ft)["status"] == "queued"
    pre_job, _ = service.wait(pre)
    assert pre_job["status"] == "succeeded", pre_job["error"]
    assert service.get(f"/v1/jobs/{pre}/results") == [] and len(pre_job["outputs"]["backbones"]) == 1
    metrics = service.get(f"/v1/jobs/{pre}/metrics")
    assert [(m["stage"], m["epoch"]) for m in metrics] == [("pretrain", 1)]
    assert "knn" in metrics[0]["values"]  # rank 0 monitors, and reports once per epoch
    assert any("2 workers" in line["message"] for line in service.get(f"/v1/jobs/{pre}/logs"))
    ft_job, _ = service.wait(ft)
    assert ft_job["status"] == "succeeded", ft_job["error"]
    assert ft_job["started_at"] >= pre_job["finished_at"]
    assert [m["stage"] for m in service.get(f"/v1/jobs/{ft}/metrics")] == ["finetune 1:16"] * 2  # no pretraining
    assert ft_job["outputs"]["backbones"][0]["key"] == pre_job["outputs"]["backbones"][0]["key"]
    rows = service.get(f"/v1/jobs/{ft}/results")
    assert len(rows) == 1 and sum(map(sum, rows[0]["confusion_matrix"])) == 720  # each test image once


def test_a_job_larger_than_the_cluster_fails_at_once(service: Service) -> None:
    job_id = service.submit({"spec": {**SMOKE["spec"], "resources": {"device": "cpu", "workers": 64}}})
    job, _ = service.wait(job_id, timeout_s=60)
    assert job["status"] == "failed" and "asks for 64 workers but the Ray cluster has 2 CPU(s)" in job["error"]
    gpu = service.submit({"spec": {**SMOKE["spec"], "resources": {"device": "cuda", "workers": 1}}})
    job, _ = service.wait(gpu, timeout_s=60)
    assert job["status"] == "failed" and "asks for 1 GPU(s) but the Ray cluster has 0" in job["error"]


def _ray_processes_of(address: str) -> set[int]:
    """Every process under the local Ray head that listens at ``address`` (host:port)."""
    flag = f"--port={address.rsplit(':', 1)[1]}".encode()
    heads = [pid for pid in pids_running("--head") if flag in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    assert len(heads) == 1, f"{len(heads)} Ray heads at {address}"
    return set(descendants(heads[0]))


def test_a_crashed_worker_group_restarts_from_the_last_checkpoint(service: Service, local_ray: dict[str, str]) -> None:
    """kill -9 of the Ray Train worker mid-pretraining: the same attempt starts a new worker group,
    which resumes from the last epoch checkpoint; every epoch is stored once."""
    spec = {**SMOKE["spec"], "method": "simsiam", "overrides": {"pretrain.epochs": 12, "pretrain.max_images": 96}}
    job_id = service.submit({"spec": spec})
    service.wait_for_epochs(job_id, 2)
    # only this service's: the fault tests, in the other test process, train on Ray heads of their own
    ours = _ray_processes_of(local_ray["RAY_ADDRESS"])
    victims = [pid for pid in pids_running("RayTrainWorker") if pid in ours]
    assert victims, "no Ray Train worker process found"
    # a training run on a head `inco worker` starts has no Ray Datasets manager, no preemption watcher and
    # no placement-group cleaner (that the head runs no dashboard: tests/worker/test_local_ray.py)
    for helper in ("ray::DatasetManager", "ray::PreemptionWatcher", "ray::PlacementGroupCleaner"):
        assert [pid for pid in pids_running(helper) if pid in ours] == [], helper
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    job, _ = service.wait(job_id, timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1  # the queue did not need to run it again
    logs = [line["message"] for line in service.get(f"/v1/jobs/{job_id}/logs")]
    assert any("restart 1/" in m and "from the last checkpoint" in m for m in logs), logs
    epochs = [m["epoch"] for m in service.get(f"/v1/jobs/{job_id}/metrics") if m["stage"] == "pretrain"]
    assert epochs == list(range(1, 13))
    with session_scope(make_engine(service.settings.db_url)) as s:
        art = access.find_artifact(s, team_id=1, kind="backbone", key=job["outputs"]["backbones"][0]["key"])
    import torch

    assert torch.load(art.path, weights_only=True)["meta"]["resumed_at_epoch"] >= 1  # not from epoch 0
