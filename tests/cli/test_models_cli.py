"""``inco models``, ``inco export`` and ``inco predict`` as a plant team types them, in subprocesses,
against a real API server (uvicorn, SQLite) holding a smoke job's two classifiers; ``inco predict
--model RUN_FOLDER`` without any service."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.store import access
from server.store.db import make_engine, migrate, session_scope
from server.store.models import JobCreate
from tests.cli.test_service_cli import REPO, Api, _clean_env, _one_error_line, _run, _wait_ready
from worker.main import free_port
from worker.training import save_result

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def api(smoke_classifiers: dict, neu_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("models-cli-home")
    db_url = f"sqlite:///{home / 'inco.db'}"
    engine = make_engine(db_url)
    migrate(engine)
    with session_scope(engine) as s:
        team = access.ensure_team(s, name="plant")
        token = access.create_token(s, team=team, scopes=["read", "predict"])
        body = JobCreate.model_validate({"spec": {"preset": "smoke", "ratios": ["1:16"]}})
        job_id = access.create_job(s, team_id=team.id, request=body, spec=body.spec.model_dump(mode="json")).id
    save_result(engine, job_id=job_id, team_id=1, dataset="default", result=smoke_classifiers["result"])
    engine.dispose()
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
        yield Api(url=f"http://127.0.0.1:{port}", token=token, home=home, db_url=db_url)
    finally:
        proc.terminate()
        proc.wait(15)


def _inco(api: Api, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(args, {"INCO_HOME": str(api.home), "INCO_API_URL": api.url, "INCO_TOKEN": api.token})


@pytest.fixture(scope="module")
def images(smoke_classifiers: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 test images in nested folders."""
    folder = tmp_path_factory.mktemp("line-3")
    for i, path in enumerate(smoke_classifiers["test_files"][::60]):
        target = folder / f"shift-{i % 2}" / path.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(path, target)
    return folder


def _models(api: Api, *args: str) -> list[dict]:
    proc = _inco(api, "models", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_models_lists_and_filters(api: Api, smoke_classifiers: dict) -> None:
    assert sorted(m["eval"] for m in _models(api)) == ["finetune", "linear"]
    best = _models(api, "--best")
    accuracies = [r["accuracy"] for r in smoke_classifiers["result"]["results"]]
    assert len(best) == 1 and best[0]["accuracy"] == max(accuracies)
    assert [m["eval"] for m in _models(api, "--eval", "linear", "--ratio", "1:16")] == ["linear"]
    assert _models(api, "--ratio", "1:8") == []
    table = _inco(api, "models")
    assert table.returncode == 0 and "InCo with DWV" in table.stdout and "1:16" in table.stdout
    assert "inco predict MODEL" in table.stderr
    assert "--ratio: ratio must look like 1:16" in _one_error_line(_inco(api, "models", "--ratio", "16"))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pytorch"])
def test_export_writes_the_file_and_its_card(api: Api, fmt: str, tmp_path: Path) -> None:
    model = _models(api, "--best")[0]
    out = tmp_path / "exports" / f"steel.{fmt}"
    proc = _inco(api, "export", str(model["id"]), "--format", fmt, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 1_000_000 and f"wrote {out}" in proc.stderr
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["model"] == model["id"] and card["classes"] == model["classes"]
    if fmt == "onnx":
        import numpy as np
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        probs = session.run(None, {"image": np.zeros((3, 1, 32, 32), np.float32)})[0]
        assert probs.shape == (3, 6) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_export_of_an_unknown_model_or_format_is_one_error_line(api: Api, tmp_path: Path) -> None:
    assert "has no model 999" in _one_error_line(_inco(api, "export", "999", "-o", str(tmp_path / "x.onnx")))
    assert "--format must be onnx" in _one_error_line(_inco(api, "export", "1", "--format", "tflite"))
    assert not (tmp_path / "x.onnx").exists()


def test_predict_folders_through_the_service_and_offline_agree(api: Api, images: Path, smoke_classifiers: dict) -> None:
    model = _models(api, "--best")[0]
    served = _inco(api, "predict", str(model["id"]), str(images), "--format", "json")
    assert served.returncode == 0, served.stderr
    answers = json.loads(served.stdout)
    assert len(answers) == 12 and {Path(a["file"]).parent.name for a in answers} == {"shift-0", "shift-1"}
    assert all(a["predicted"] in model["classes"] and len(a["top_k"]) == 3 for a in answers)

    run_dir = Path(smoke_classifiers["result"]["run_dir"])  # the run folder `inco run` writes
    offline = _inco(api, "predict", "--model", str(run_dir), str(images), "--format", "json")
    assert offline.returncode == 0, offline.stderr
    local = json.loads(offline.stdout)
    assert [a["predicted"] for a in local] == [a["predicted"] for a in answers]  # the best model both times
    for x, y in zip(local, answers, strict=True):
        assert all(abs(x["probabilities"][c] - y["probabilities"][c]) < 1e-4 for c in x["probabilities"])
        assert x["prediction_set"] == y["prediction_set"]

    rows = list(
        csv.DictReader(io.StringIO(_inco(api, "predict", str(model["id"]), str(images), "--format", "csv").stdout))
    )
    assert [r["predicted"] for r in rows] == [a["predicted"] for a in answers]
    table = _inco(api, "predict", str(model["id"]), str(images))
    assert table.returncode == 0 and "12 image(s);" in table.stderr and "shift-1" in table.stdout


def test_predict_bad_input_is_one_error_line(api: Api, images: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    assert "does not exist" in _one_error_line(_inco(api, "predict", "1", str(tmp_path / "missing")))
    assert "is not a model id" in _one_error_line(_inco(api, "predict", "best", str(images)))
    assert "notes.txt" in _one_error_line(_inco(api, "predict", "1", str(tmp_path / "notes.txt")))
    (tmp_path / "empty-dir").mkdir()
    assert "no image files" in _one_error_line(_inco(api, "predict", "1", str(tmp_path / "empty-dir")))
    assert "not a run folder" in _one_error_line(_inco(api, "predict", "--model", str(tmp_path), str(images)))


def test_the_team_review_level_is_predicts_default(api: Api, images: Path) -> None:
    env = {"INCO_HOME": str(api.home), "INCO_DATABASE_URL": api.db_url}
    model = _models(api, "--best")[0]
    wide = _run(("admin", "team", "set", "--team", "plant", "--review-level", "0.99"), env)
    assert wide.returncode == 0 and "99.0% coverage" in wide.stdout, wide.stderr
    image = next(images.rglob("*.jpg"))
    files = [("files", (image.name, image.read_bytes(), "image/jpeg"))]
    headers = {"Authorization": f"Bearer {api.token}"}
    answer = httpx.post(f"{api.url}/v1/models/{model['id']}/predict", files=files, headers=headers, timeout=60)
    assert answer.status_code == 200 and answer.json()["level"] == 0.99, answer.text  # the team's default
    answer = httpx.post(
        f"{api.url}/v1/models/{model['id']}/predict", params={"level": 0.8}, files=files, headers=headers, timeout=60
    )
    assert answer.json()["level"] == 0.8  # asked for
    from server.store.db import make_engine, session_scope
    from server.store.models import Team

    engine = make_engine(api.db_url)
    with session_scope(engine) as s:
        assert s.get(Team, 1).review_level == 0.99
    engine.dispose()
    missing = _run(("admin", "team", "set", "--team", "nobody", "--review-level", "0.9"), env)
    assert "no team named 'nobody'" in _one_error_line(missing)
    bad = _run(("admin", "team", "set", "--team", "plant", "--review-level", "1.5"), env)
    assert bad.returncode == 2 and "--review-level" in bad.stderr and "0.999" in bad.stderr
