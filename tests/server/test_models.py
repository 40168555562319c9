"""The model registry through the API: list, download (ONNX, TorchScript, PyTorch, the card inside),
predict on real NEU-CLS images with exactly the run's test accuracy, bad input, scopes and 410."""

from __future__ import annotations

import io
import json
import secrets
import shutil
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from inco_core.classifier import check_export, load_classifier
from inco_core.evaluate import classification_metrics
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from server.store.models import Artifact, Model
from tests.service_fixtures import REDIS_TEST, auth, make_team
from worker.training import save_result

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EVERY = ["read", "submit", "admin", "predict"]


@pytest.fixture(scope="module")
def registry(smoke_classifiers: dict, neu_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The API on SQLite with team alpha, whose smoke job's two classifiers are registered the way the
    worker registers them (:func:`worker.training.save_result`)."""
    from server.api.app import create_app

    home = tmp_path_factory.mktemp("models-home")
    settings = Settings(
        home=home,
        database_url=f"sqlite:///{home / 'inco.db'}",
        redis_url=REDIS_TEST,
        data_root=neu_path.parent,
        queue=f"inco-test-{secrets.token_hex(3)}",
        max_predict_images=720,
        predict_slots=1,
    )
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.engine
        token = make_team(engine, "alpha", scopes=EVERY)
        r = client.post("/v1/datasets", json={"name": "default", "path": neu_path.name}, headers=auth(token))
        assert r.status_code == 201, r.text
        r = client.post("/v1/jobs", json={"spec": {"preset": "smoke", "ratios": ["1:16"]}}, headers=auth(token))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        save_result(engine, job_id=job_id, team_id=1, dataset="default", result=smoke_classifiers["result"])
        save_result(engine, job_id=job_id, team_id=1, dataset="default", result=smoke_classifiers["result"])  # twice
        yield {"client": client, "token": token, "job_id": job_id, "home": home, **smoke_classifiers}


def _get(reg: dict, path: str, token: str | None = None, **kw):  # type: ignore[no-untyped-def]
    return reg["client"].get(path, headers=auth(token or reg["token"]), **kw)


def _predict(reg: dict, model_id: int, files: list[tuple[str, bytes, str]], token: str | None = None, **params):  # type: ignore[no-untyped-def]
    return reg["client"].post(
        f"/v1/models/{model_id}/predict",
        files=[("files", f) for f in files],
        params=params,
        headers=auth(token or reg["token"]),
    )


def _model(reg: dict, mode: str) -> dict:
    return next(m for m in _get(reg, "/v1/models").json() if m["eval"] == mode)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_every_classifier_of_the_job_is_a_model(registry: dict) -> None:
    models = _get(registry, "/v1/models").json()
    rows = {r["eval"]: r for r in registry["result"]["results"]}
    assert sorted(m["eval"] for m in models) == ["finetune", "linear"]  # stored once though saved twice
    for m in models:
        row = rows[m["eval"]]
        assert m["job_id"] == registry["job_id"] and m["ratio"] == "1:16" and m["method"] == "inco"
        assert m["seed"] == 0 and m["dataset"] == "default" and m["preset"] == "smoke"
        assert m["classes"] == row["classes"] and m["image_size"] == 32 and m["accuracy"] == row["accuracy"]
        assert m["per_class_recall"] == row["per_class_recall"] and m["calibration_images"] == 1014
        assert m["normalisation"]["pixel_mean"] == 127.5 and m["code_version"]
    assert [m["eval"] for m in _get(registry, "/v1/models?eval=linear").json()] == ["linear"]
    assert _get(registry, "/v1/models?ratio=1:8").json() == []
    assert len(_get(registry, f"/v1/models?ratio=1%3A16&job_id={registry['job_id']}").json()) == 2
    best = _get(registry, "/v1/models?best=true").json()
    assert len(best) == 1 and best[0]["accuracy"] == max(m["accuracy"] for m in models)
    one = _get(registry, f"/v1/models/{models[0]['id']}")
    assert one.status_code == 200 and one.json() == models[0]


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/v1/models/999999", 404, "has no model 999999"),
        ("/v1/models/abc", 422, "model_id"),
        ("/v1/models/0", 422, "model_id"),
        ("/v1/models/99999999999999999999", 422, "model_id"),
        ("/v1/models?ratio=16", 422, "ratio"),
        ("/v1/models?method=resnet", 422, "unknown method"),
        ("/v1/models/1/file?format=tflite", 422, "format"),
    ],
)
def test_bad_model_requests_are_clear_4xx(registry: dict, path: str, status: int, message: str) -> None:
    r = _get(registry, path)
    assert r.status_code == status and message in r.json()["detail"], r.text


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pytorch"])
def test_a_download_runs_like_the_model_and_carries_its_card(registry: dict, fmt: str) -> None:
    model = _model(registry, "finetune")
    r = _get(registry, f"/v1/models/{model['id']}/file", params={"format": fmt})
    assert r.status_code == 200, r.text
    assert f"inco-model-{model['id']}-inco-1r16-finetune" in r.headers["content-disposition"]
    reference, _ = load_classifier(
        Path(next(x for x in registry["result"]["results"] if x["eval"] == "finetune")["checkpoint"])
    )
    if fmt == "onnx":
        import onnx

        card = json.loads({p.key: p.value for p in onnx.load_from_string(r.content).metadata_props}["inco_model_card"])
        report = check_export("onnx", r.content, reference, registry["test_images"])
        assert report["max_abs_diff"] < 1e-4 and report["argmax_agreement"] == 1.0
    elif fmt == "torchscript":
        extra = {"model_card.json": ""}
        with warnings.catch_warnings():  # TorchScript is deprecated in torch, still what many plants load
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.load(io.BytesIO(r.content), _extra_files=extra)
        card = json.loads(extra["model_card.json"])
        check_export("torchscript", r.content, reference, registry["test_images"][:64])
    else:
        blob = torch.load(io.BytesIO(r.content), weights_only=True)
        card = json.loads(blob["card"])
        assert blob["format"] == "inco-classifier" and blob["classes"] == model["classes"]
    assert card["model"] == model["id"] and card["classes"] == model["classes"] and card["image_size"] == 32
    assert card["metrics"]["test_accuracy"] == model["accuracy"] and card["preprocessing"] == model["normalisation"]
    assert card["conformal"]["calibration_images"] == 1014 and card["spec"]["preset"] == "smoke"
    assert _get(registry, f"/v1/models/{model['id']}/card").json() == card


@pytest.mark.parametrize("mode", ["finetune", "linear"])
def test_the_720_test_images_through_predict_give_the_stored_accuracy(registry: dict, mode: str) -> None:
    """Same preprocessing on both paths: the test images as files, zipped, through the API."""
    model = _model(registry, mode)
    row = next(r for r in registry["result"]["results"] if r["eval"] == mode)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, path in enumerate(registry["test_files"]):
            z.write(path, f"{i:04d}-{path.name}")
    r = _predict(registry, model["id"], [("test.zip", buf.getvalue(), "application/zip")])
    assert r.status_code == 200, r.text
    answer = r.json()
    assert len(answer["images"]) == 720 and answer["level"] == 0.9 and answer["calibration_images"] == 1014
    answer["images"].sort(key=lambda x: x["file"])
    pred = torch.tensor([model["classes"].index(x["predicted"]) for x in answer["images"]])
    metrics = classification_metrics(pred, registry["test_labels"], model["classes"])
    assert metrics.accuracy == row["accuracy"] and metrics.confusion_matrix == row["confusion_matrix"]
    for x in answer["images"]:
        assert abs(sum(x["probabilities"].values()) - 1) < 1e-4 and x["prediction_set"][0] == x["predicted"]
        assert x["needs_review"] == (len(x["prediction_set"]) > 1) and len(x["top_k"]) == 3


def test_one_image_several_images_and_colour_images(registry: dict) -> None:
    model = _model(registry, "finetune")
    path = registry["test_files"][0]
    gray = np.asarray(Image.open(path).convert("L"))
    r = _predict(registry, model["id"], [(path.name, path.read_bytes(), "image/jpeg")], top_k=6, level=0.5)
    assert r.status_code == 200, r.text
    one = r.json()["images"][0]
    assert one["file"] == path.name and len(one["top_k"]) == 6 and r.json()["level"] == 0.5
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full_like(gray[:, :, None], 255)], axis=2)
    palette = Image.fromarray(gray).convert("P")
    pbuf = io.BytesIO()
    palette.save(pbuf, format="PNG")
    r = _predict(
        registry,
        model["id"],
        [
            ("gray.png", _png(gray), "image/png"),
            ("rgb.png", _png(rgb), "image/png"),
            ("rgba.png", _png(rgba), "image/png"),
            ("palette.png", pbuf.getvalue(), "image/png"),
        ],
    )
    assert r.status_code == 200, r.text
    probs = [x["probabilities"] for x in r.json()["images"]]
    for other in probs[1:]:  # colour converted as training converts: the same pixels, the same answer
        assert all(abs(other[c] - probs[0][c]) < 1e-5 for c in probs[0])


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (10_000, 6_000)).save(buf, format="PNG")  # 60 M pixels in a few KiB
    return buf.getvalue()


def _traversal_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../../evil.png", _png(np.zeros((8, 8), np.uint8)))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([("notes.txt", b"this is not an image", "text/plain")], "notes.txt"),
        ([("empty.jpg", b"", "image/jpeg")], "empty.jpg: the file is empty"),
        ([("bomb.png", _bomb(), "image/png")], "bomb.png: 10000 x 6000 pixels"),
        ([("deep.png", _png(np.zeros((16, 16), np.uint16)), "image/png")], "16- or 32-bit"),
        ([("evil.zip", _traversal_zip(), "application/zip")], "evil.zip"),
    ],
)
def test_bad_images_are_a_422_naming_the_file(registry: dict, files: list, message: str) -> None:
    model = _model(registry, "finetune")
    r = _predict(registry, model["id"], files)
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_truncated_images_too_many_images_and_unknown_models(registry: dict) -> None:
    model = _model(registry, "finetune")
    data = registry["test_files"][0].read_bytes()
    r = _predict(registry, model["id"], [("cut.jpg", data[: len(data) // 2], "image/jpeg")])
    assert r.status_code == 422 and "cut.jpg" in r.json()["detail"], r.text
    png = _png(np.zeros((8, 8), np.uint8))
    r = _predict(registry, model["id"], [(f"{i}.png", png, "image/png") for i in range(721)])
    assert r.status_code == 422 and "more than the 720 one request takes" in r.json()["detail"], r.text
    assert _predict(registry, 424242, [("a.png", png, "image/png")]).status_code == 404
    boundary = "7c5156fb04a2177cf9e322ad31ebde44"  # a malformed form (schemathesis found Starlette's bare 400)
    r = registry["client"].post(
        f"/v1/models/{model['id']}/predict",
        content=f"--{boundary}\r\nNone--{boundary}--\r\n".encode(),
        headers={**auth(registry["token"]), "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 422 and "cannot be parsed" in r.json()["detail"], r.text
    assert _predict(registry, model["id"], [], level=0.9).status_code == 422
    for params in ({"level": 1.5}, {"level": 0}, {"level": "nan"}, {"level": "inf"}, {"top_k": 0}, {"top_k": 101}):
        r = _predict(registry, model["id"], [("a.png", png, "image/png")], **params)
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{next(iter(params))}: "), (params, r.text)


def test_predict_needs_the_predict_scope_and_nothing_else(registry: dict) -> None:
    engine = registry["client"].app.state.engine
    line = make_team(engine, "alpha", scopes=["predict"])
    reader = make_team(engine, "alpha", scopes=["read"])
    model = _model(registry, "finetune")
    png = _png(np.zeros((32, 32), np.uint8))
    assert _predict(registry, model["id"], [("a.png", png, "image/png")], token=line).status_code == 200
    r = _predict(registry, model["id"], [("a.png", png, "image/png")], token=reader)
    assert r.status_code == 403 and "lacks the 'predict' scope" in r.json()["detail"]
    assert _get(registry, "/v1/models", token=line).status_code == 403


def test_saturated_prediction_slots_answer_429_with_retry_after(registry: dict) -> None:
    model = _model(registry, "finetune")
    png = _png(np.zeros((32, 32), np.uint8))
    assert _predict(registry, model["id"], [("a.png", png, "image/png")]).status_code == 200  # loaded
    slots = registry["client"].app.state.model_files._slots
    assert slots.acquire(timeout=5)  # the one slot (INCO_PREDICT_SLOTS=1) is taken by another request
    try:
        r = _predict(registry, model["id"], [("a.png", png, "image/png")])
        assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "busy" in r.json()["detail"]
        assert _get(registry, "/v1/models").status_code == 200  # other routes answer meanwhile
    finally:
        slots.release()
    assert _predict(registry, model["id"], [("a.png", png, "image/png")]).status_code == 200


def test_a_model_whose_file_is_gone_answers_410(registry: dict) -> None:
    engine = registry["client"].app.state.engine
    source = next(r for r in registry["result"]["results"] if r["eval"] == "finetune")
    copy = registry["home"] / "doomed.pt"
    shutil.copy(source["checkpoint"], copy)
    with session_scope(engine) as s:
        original = s.get(Model, _model(registry, "finetune")["id"])
        artifact = access.add_artifact(
            s,
            artifact=Artifact(
                team_id=1,
                job_id=registry["job_id"],
                kind="classifier",
                key="doomed",
                method="inco",
                seed=7,
                path=str(copy),
                size_bytes=copy.stat().st_size,
            ),
        )
        doomed = access.add_model(
            s,
            model=Model(
                **{**original.model_dump(exclude={"id", "artifact_id", "seed"}), "artifact_id": artifact.id, "seed": 7}
            ),
        )
        doomed_id = doomed.id
    copy.unlink()
    assert _get(registry, f"/v1/models/{doomed_id}").status_code == 200  # still registered
    for r in (
        _get(registry, f"/v1/models/{doomed_id}/file"),
        _get(registry, f"/v1/models/{doomed_id}/card"),
        _predict(registry, doomed_id, [("a.png", _png(np.zeros((8, 8), np.uint8)), "image/png")]),
    ):
        assert r.status_code == 410 and "no longer in the artifact store" in r.json()["detail"], r.text
