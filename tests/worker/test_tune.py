"""``tune`` jobs end to end: Ray Tune (ASHA + Optuna) over Ray Train trials, through the API, on the
real NEU-CLS images; the best trial becomes an experiment with ``from_tune``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from inco_core.config import RunSpec
from inco_core.data import load_images
from inco_core.splits import stratified_split
from tests.worker.conftest import ray_head
from tests.worker.harness import Service, running_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REDIS_TUNE = os.environ.get("INCO_TEST_REDIS_TUNE", "redis://127.0.0.1:6379/12")
# 2 epochs of 128 images so that ASHA has a rung (epoch 1) before the end
TUNE = {
    "kind": "tune",
    "spec": {
        "ratios": ["1:16"],
        "preset": "smoke",
        "overrides": {"pretrain.epochs": 2, "pretrain.max_images": 128},
        "resources": {"device": "cpu"},
    },
    "tune": {"trials": 4, "grace_epochs": 1},
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, neu_path: Path) -> Iterator[Service]:
    """A Ray head of its own: a search fills the cluster, and nothing an earlier file left on the
    shared head (an actor, a placement group) may hold CPUs its trials wait for."""
    home = tmp_path_factory.mktemp("tune-home")
    with (
        ray_head(home / "ray") as ray,
        running_service(home, neu_path, ray, redis_url=REDIS_TUNE, cpus_per_worker=1) as svc,
    ):
        yield svc


@pytest.fixture(scope="module")
def tuned(service: Service) -> tuple[str, dict]:
    job_id = service.submit(TUNE)
    job, _ = service.wait(job_id, timeout_s=600)
    return job_id, job


def test_a_tiny_search_stores_four_trials_best_first(service: Service, tuned: tuple[str, dict]) -> None:
    job_id, job = tuned
    assert job["status"] == "succeeded", job["error"]
    trials = service.get(f"/v1/jobs/{job_id}/trials")
    assert sorted(t["number"] for t in trials) == [1, 2, 3, 4]
    assert all(t["status"] in ("completed", "stopped") for t in trials), trials
    assert trials[0]["status"] == "completed" and trials[0]["epoch"] == 2
    completed = [t["score"] for t in trials if t["status"] == "completed"]
    assert completed == sorted(completed, reverse=True)
    for t in trials:
        assert set(t["params"]) == {
            "pretrain.inco.t1",
            "pretrain.inco.t2",
            "pretrain.inco.a_f",
            "pretrain.inco.views",
            "pretrain.optim.lr",
        }
        assert 0 <= t["params"]["pretrain.inco.t1"] < t["params"]["pretrain.inco.t2"] <= 2
        assert 2 <= t["params"]["pretrain.inco.views"] <= 8
        assert t["score"] is not None and 0 <= t["score"] <= 1
    best = job["outputs"]["best"]
    assert best["trial"] == trials[0]["number"] and best["params"] == trials[0]["params"]
    # per-epoch metrics of each trial are stored under its own stage
    stages = {m["stage"] for m in service.get(f"/v1/jobs/{job_id}/metrics")}
    assert {f"trial {n}" for n in range(1, 5)} <= stages


def test_no_trial_reads_a_test_image(service: Service, tuned: tuple[str, dict], neu_path: Path) -> None:
    job_id, job = tuned
    spec = RunSpec.model_validate(job["spec"])
    ds = load_images(neu_path, spec.resolve().image_size, cache_dir=service.settings.cache_dir / "images")
    split = stratified_split(
        ds.labels, ds.file_hashes, ds.classes, train_fraction=spec.data.train_fraction, seed=spec.data.split_seed
    )
    test = set(split.test.tolist())
    assert len(test) == 720
    folders = sorted((service.settings.artifact_dir / "runs" / job_id).glob("trial-*"))
    assert len(folders) == 4
    for folder in folders:
        used = json.loads((folder / "indices.json").read_text())
        for part in ("pretrain", "fit", "val"):
            assert used[part] and not test.intersection(used[part]), (folder.name, part)
        assert not set(used["fit"]) & set(used["val"])
        assert len(used["pretrain"]) == 128
        labelled = torch.tensor(used["fit"] + used["val"])
        assert len(labelled) == 66  # 1:16 of 1,080 training images: round(180 / 16) = 11 per class


def test_the_best_trial_runs_as_an_experiment(service: Service, tuned: tuple[str, dict]) -> None:
    job_id, job = tuned
    r = service.client.post(
        "/v1/jobs",
        json={"from_tune": job_id, "spec": {"ratios": ["1:16"], "evals": ["linear"]}},
        headers=service.headers,
    )
    assert r.status_code == 201, r.text
    created = r.json()
    best = job["outputs"]["best"]
    assert created["outputs"]["from_tune"]["trial"] == best["trial"]
    assert created["spec"]["preset"] == "smoke" and created["spec"]["method"] == "inco"
    assert created["spec"]["resources"]["device"] == "cpu"
    resolved = RunSpec.model_validate(created["spec"]).resolve()
    assert resolved.pretrain.epochs == 2 and resolved.pretrain.max_images == 128
    assert resolved.pretrain.inco.views == best["params"]["pretrain.inco.views"]
    assert resolved.pretrain.optim.lr == pytest.approx(best["params"]["pretrain.optim.lr"])
    done, _ = service.wait(created["id"])
    assert done["status"] == "succeeded", done["error"]
    rows = service.get(f"/v1/jobs/{created['id']}/results")
    assert len(rows) == 1 and rows[0]["test_images"] == 720


def test_from_tune_needs_a_finished_tune_job(service: Service, tuned: tuple[str, dict]) -> None:
    experiment = service.get("/v1/jobs")
    other = next(j for j in experiment if j["kind"] == "experiment")
    r = service.client.post("/v1/jobs", json={"from_tune": other["id"], "spec": {}}, headers=service.headers)
    assert r.status_code == 422 and "not a tune job" in r.json()["detail"]
    r = service.client.post("/v1/jobs", json={"from_tune": "nope", "spec": {}}, headers=service.headers)
    assert r.status_code == 422 and "no job 'nope'" in r.json()["detail"]
    r = service.client.get(f"/v1/jobs/{other['id']}/trials", headers=service.headers)
    assert r.status_code == 404 and "tune jobs" in r.json()["detail"]


def test_a_search_whose_trials_all_fail_fails_with_their_error(service: Service) -> None:
    # at 1:256 every class has one labelled image: nothing is left to validate a trial on
    body = {**TUNE, "spec": {**TUNE["spec"], "ratios": ["1:256"]}, "tune": {"trials": 2, "max_concurrent": 2}}
    job, _ = service.wait(service.submit(body), timeout_s=400)
    assert job["status"] == "failed"
    assert "no trial ran to the end (2 tried)" in job["error"] and "1 labelled image(s)" in job["error"]
    trials = service.get(f"/v1/jobs/{job['id']}/trials")
    assert [t["status"] for t in trials] == ["failed", "failed"]
    assert all("scoring trials needs 2 per class" in t["error"] for t in trials)


def test_a_canceled_search_stops_its_trials(service: Service) -> None:
    """A search of two-worker trials (each its own Ray Train TorchTrainer; one-worker trials, as in the
    searches above, train in their Tune function) is canceled while its trial trains."""
    spec = {
        **TUNE["spec"],
        "resources": {"device": "cpu", "workers": 2},
        "overrides": {"pretrain.epochs": 50, "pretrain.max_images": 64},
    }
    body = {**TUNE, "spec": spec}
    job_id = service.submit({**body, "tune": {"trials": 1}})
    service.wait_for_epochs(job_id, 1, timeout_s=300)
    r = service.client.post(f"/v1/jobs/{job_id}/cancel", headers=service.headers)
    assert r.status_code == 200, r.text
    job, _ = service.wait(job_id, timeout_s=120)
    assert job["status"] == "canceled"
    trials = service.get(f"/v1/jobs/{job_id}/trials")
    assert trials and all(t["status"] in ("stopped", "failed") and t["epoch"] < 50 for t in trials), trials
