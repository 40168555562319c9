"""Hostile and broken requests against the real API (real Redis, SQLite and PostgreSQL): absurd run
specs, malformed bodies, bodies over the size limit, data set paths out of the data root. Each gets a
4xx that names the field and the fix, and nothing is stored: no job row, no queue entry, no data set."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue

from server.api.app import create_app
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from tests.service_fixtures import REDIS_TEST, auth, make_team, team_with_dataset

pytestmark = pytest.mark.integration
SMOKE = {"spec": {"ratios": ["1:16"], "preset": "smoke"}}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite here (many small cases); test_nothing_stored_on_postgresql_either runs a set on PostgreSQL."""
    return f"sqlite:///{tmp_path / 'inco.db'}"


@pytest.fixture
def small_root(neu_path: Path, tmp_path: Path) -> Path:
    """A data root of its own with a two-class copy of NEU-CLS (3 images a class) in ``small``."""
    root = tmp_path / "root"
    for cls in ("crazing", "patches"):
        (root / "small" / cls).mkdir(parents=True)
        for i in (1, 2, 3):
            shutil.copy(neu_path / cls / f"{cls}_{i}.jpg", root / "small" / cls)
    return root


@pytest.fixture
def settings(tmp_path: Path, db_url: str, redis_db: Redis, small_root: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=db_url,
        redis_url=REDIS_TEST,
        data_root=small_root,
        queue=f"inco-test-{secrets.token_hex(3)}",
    )


@pytest.fixture
def token(client: TestClient) -> str:
    """Team alpha with a small data set registered as 'default', so a valid job would be accepted."""
    return team_with_dataset(client, path="small")


def _nothing_stored(client: TestClient, token: str, redis: Redis, settings: Settings) -> None:
    assert client.get("/v1/jobs", headers=auth(token)).json() == []
    assert Queue(settings.queue, connection=redis).job_ids == []


def _post_raw(client: TestClient, path: str, content: bytes, token: str, content_type: str = "application/json"):
    return client.post(path, content=content, headers={**auth(token), "content-type": content_type})


def _dumps(body: object) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN and Infinity as Python writes them


# -- absurd values -------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"spec": {"overrides": {"pretrain.epochs": 10**9}}}, "overrides.pretrain.epochs"),
        ({"spec": {"overrides": {"finetune": {"epochs": 10**9}}}}, "overrides.finetune.epochs"),
        ({"spec": {"overrides": {"linear.epochs": 0}}}, "overrides.linear.epochs"),
        ({"spec": {"overrides": {"pretrain.inco.views": 0}}}, "overrides.pretrain.inco.views"),
        ({"spec": {"overrides": {"pretrain.inco.views": 10**6}}}, "overrides.pretrain.inco.views"),
        ({"spec": {"ratios": ["1:0"]}}, "spec.ratios.0"),
        ({"spec": {"ratios": ["1:" + "9" * 5000]}}, "spec.ratios.0"),
        ({"spec": {"ratios": [f"1:{n}" for n in range(1, 10_001)]}}, "spec.ratios"),
        ({"spec": {"overrides": {"pretrain.inco.temperature": -1}}}, "overrides.pretrain.inco.temperature"),
        ({"spec": {"overrides": {"pretrain.simclr.temperature": 0}}}, "overrides.pretrain.simclr.temperature"),
        ({"spec": {"overrides": {"pretrain.mocov2.temperature": -0.2}}}, "overrides.pretrain.mocov2.temperature"),
        ({"spec": {"overrides": {"pretrain.inco.a_f": -1}}}, "overrides.pretrain.inco.a_f"),
        ({"spec": {"overrides": {"pretrain.inco.a_f": 10**9}}}, "overrides.pretrain.inco.a_f"),
        ({"spec": {"overrides": {"pretrain.inco.t2": 10**9}}}, "overrides.pretrain.inco.t2"),
        ({"spec": {"resources": {"workers": 10**6}}}, "spec.resources.workers"),
        ({"spec": {"resources": {"workers": 0}}}, "spec.resources.workers"),
        ({"spec": {"resources": {"gpus_per_worker": 1000}}}, "spec.resources.gpus_per_worker"),
        ({"spec": {"resources": {"gpus_per_worker": -1}}}, "spec.resources.gpus_per_worker"),
        ({"spec": {"overrides": {"pretrain.batch_size": 10**9}}}, "overrides.pretrain.batch_size"),
        ({"spec": {"overrides": {"finetune.batch_size": 1}}}, "overrides.finetune.batch_size"),
        ({"spec": {"overrides": {"image_size": 10**6}}}, "overrides.image_size"),
        ({"spec": {"overrides": {"image_size": 4}}}, "overrides.image_size"),
        ({"spec": {"overrides": {"pretrain.optim.lr": 10**9}}}, "overrides.pretrain.optim.lr"),
        ({"spec": {"overrides": {"pretrain.optim.lr": 0}}}, "overrides.pretrain.optim.lr"),
        ({"spec": {"overrides": {"pretrain.max_images": 10**12}}}, "overrides.pretrain.max_images"),
        ({"spec": {"overrides": {"pretrain.augment.crop_scale": [0.2, 5]}}}, "overrides.pretrain.augment.crop_scale"),
        ({"spec": {"seeds": list(range(10_000))}}, "spec.seeds"),
        ({"spec": {"seeds": [-1]}}, "spec.seeds"),
        ({"spec": {"seeds": [2**40]}}, "spec.seeds"),
        ({"spec": {"evals": ["finetune"] * 10_000}}, "spec.evals"),
        ({"spec": {"data": {"split_seed": -1}}}, "spec.data.split_seed"),
        ({"spec": {"data": {"on_corrupt": "ignore"}}}, "spec.data.on_corrupt"),
        ({"spec": {"overrides": {"pretrain.epocs": 3}}}, "overrides.pretrain.epocs: unknown field"),
        ({"spec": {"overrides": {"pretrain": {"inco": {"tau": 1}}}}}, "overrides.pretrain.inco.tau: unknown field"),
        ({"spec": {"overrides": {f"k{i}": 1 for i in range(10_000)}}}, "spec.overrides"),
        ({"spec": {"overrides": {"x" * 5000: 1}}}, "spec.overrides"),
        ({"spec": {"overrides": {"pretrain": 5, "pretrain.epochs": 3}}}, "conflicts with another override"),
        # NaN and infinity, written as Python's json writes them
        ({"spec": {"overrides": {"pretrain.optim.lr": NAN}}}, "overrides.pretrain.optim.lr: Input should be a finite"),
        ({"spec": {"overrides": {"pretrain.inco.t1": INF}}}, "overrides.pretrain.inco.t1"),
        ({"spec": {"overrides": {"pretrain.inco.temperature": -INF}}}, "overrides.pretrain.inco.temperature"),
        ({"spec": {"resources": {"gpus_per_worker": NAN}}}, "spec.resources.gpus_per_worker"),
        ({"spec": {"data": {"train_fraction": NAN}}}, "spec.data.train_fraction"),
        ({"kind": "tune", "spec": {}, "tune": {"val_fraction": NAN}}, "tune.val_fraction"),
    ],
)
def test_absurd_values_are_422_with_the_field_named_and_nothing_stored(
    client: TestClient, token: str, redis_db: Redis, settings: Settings, body: dict, field: str
) -> None:
    r = _post_raw(client, "/v1/jobs", _dumps(body), token)
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"], r.json()["detail"]
    assert len(r.json()["detail"]) < 3000  # a few errors and a count, not ten thousand
    _nothing_stored(client, token, redis_db, settings)


def test_the_paper_preset_and_a_normal_job_still_pass(
    client: TestClient, token: str, redis_db: Redis, settings: Settings
) -> None:
    """The bounds leave room for real work (and the tests above could fail)."""
    body = {
        "spec": {
            "preset": "paper",
            "ratios": ["1:2", "1:4", "1:8", "1:16", "1:32"],
            "evals": ["finetune", "linear"],
            "seeds": list(range(5)),
            "overrides": {"pretrain.batch_size": 256, "pretrain.inco.views": 8, "pretrain.inco.temperature": 0.5},
            "resources": {"workers": 4, "gpus_per_worker": 1},
            "data": {"on_corrupt": "skip"},
        }
    }
    r = client.post("/v1/jobs", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["data"]["on_corrupt"] == "skip"
    assert Queue(settings.queue, connection=redis_db).job_ids == [r.json()["id"]]


# -- malformed bodies -------------------------------------------------------------------------------
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "field required"),
        (b"[]", "should be a valid dictionary"),
        (b'[{"spec": {}}]', "should be a valid dictionary"),
        (b'"spec"', "should be a valid dictionary"),
        (b"null", "should be a valid dictionary"),
        (b"\xff\xfe\x00garbage", ""),
        (b'{"spec": "\xff\xfe"}', "byte 10 is not utf-8 text"),  # not text: 422, not FastAPI's bare 400
        (b'{"spec": []}', "spec: Input should be a valid dictionary"),
        (b'{"spec": {"seeds": "zero"}}', "spec.seeds: Input should be a valid list"),
        (b'{"spec": {"seeds": ["zero"]}}', "spec.seeds.0: Input should be a valid integer"),
        (b'{"spec": {"ratios": 16}}', "spec.ratios: Input should be a valid list"),
        (b'{"spec": {"overrides": []}}', "spec.overrides: Input should be a valid dictionary"),
        (b'{"kind": 5, "spec": {}}', "kind: "),
        (b'{"spec": {}, "colour": "red"}', "colour: unknown field"),
        (b'{"spec": {"data": {"colour": 1}}}', "spec.data.colour: unknown field"),
        (b'{"spec": {"resources": {"gpu": 1}}}', "spec.resources.gpu: unknown field"),
        (b'{"spec": {"overrides": ' + b'{"a": ' * 50 + b"1" + b"}" * 51 + b"}", "nested more than 8 levels"),
        (DEEP, ""),
        (b'{"spec": {"ratios": ["' + b"x" * 900_000 + b'"]}}', "spec.ratios.0"),
    ],
)
def test_malformed_bodies_are_4xx_never_500_and_store_nothing(
    client: TestClient, token: str, redis_db: Redis, settings: Settings, content: bytes, message: str
) -> None:
    r = _post_raw(client, "/v1/jobs", content, token)
    assert 400 <= r.status_code < 500 and r.status_code in (400, 413, 422), (r.status_code, r.text[:300])
    assert isinstance(r.json()["detail"], str) and message in r.json()["detail"], r.text[:300]
    _nothing_stored(client, token, redis_db, settings)
    r = _post_raw(client, "/v1/datasets", content, token)
    assert r.status_code in (400, 413, 422), (r.status_code, r.text[:300])
    assert [d["name"] for d in client.get("/v1/datasets", headers=auth(token)).json()] == ["default"]


def test_deeply_nested_json_is_refused_with_a_clear_message(client: TestClient, token: str) -> None:
    r = _post_raw(client, "/v1/jobs", DEEP, token)
    assert r.status_code == 422, r.text[:300]
    assert "nested" in r.json()["detail"]


# -- size limits -------------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_413_before_it_is_read(
    client: TestClient, token: str, redis_db: Redis, settings: Settings
) -> None:
    huge = {"spec": {"preset": "smoke", "overrides": {"note": "x" * (10 << 20)}}}  # a 10 MB string field
    content = json.dumps(huge).encode()
    r = _post_raw(client, "/v1/jobs", content, token)
    assert r.status_code == 413, r.text[:300]
    assert "larger than the server's limit of 1 MiB (INCO_MAX_BODY_BYTES)" in r.json()["detail"]
    _nothing_stored(client, token, redis_db, settings)


def test_a_chunked_body_is_counted_while_it_streams(
    client: TestClient, token: str, redis_db: Redis, settings: Settings
) -> None:
    sent = []

    def chunks() -> Iterator[bytes]:
        yield b'{"spec": {"preset": "smoke", "overrides": {"note": "'
        for _ in range(40):
            sent.append(1)
            yield b"x" * (256 << 10)
        yield b'"}}}'

    r = client.post("/v1/jobs", content=chunks(), headers={**auth(token), "content-type": "application/json"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413, r.text[:300]
    assert "INCO_MAX_BODY_BYTES" in r.json()["detail"]
    _nothing_stored(client, token, redis_db, settings)


def test_the_limit_follows_the_settings_and_a_body_under_it_passes(
    client: TestClient, token: str, redis_db: Redis, settings: Settings
) -> None:
    client.app.state.settings = settings.model_copy(update={"max_body_bytes": 2048})
    padded = json.dumps(SMOKE).encode() + b" " * 1900  # 2,000 bytes or so: under the limit
    assert len(padded) <= 2048
    r = _post_raw(client, "/v1/jobs", padded, token)
    assert r.status_code == 201, r.text
    r = _post_raw(client, "/v1/jobs", padded + b" " * 100, token)
    assert r.status_code == 413 and "2 KiB" in r.json()["detail"]
    chunked = client.post(
        "/v1/jobs", content=iter([padded, b" " * 100]), headers={**auth(token), "content-type": "application/json"}
    )
    assert chunked.status_code == 413
    assert len(client.get("/v1/jobs", headers=auth(token)).json()) == 1
    assert Queue(settings.queue, connection=redis_db).count == 1


def test_archives_have_their_own_limit(client: TestClient, token: str, settings: Settings, small_root: Path) -> None:
    root = small_root
    client.app.state.settings = settings.model_copy(update={"max_body_bytes": 2048, "max_upload_bytes": 64 << 10})
    garbage = os.urandom(32 << 10)  # over the JSON limit, under the upload limit: reaches the route
    h = {**auth(token), "content-type": "application/zip"}
    r = client.post("/v1/datasets?name=junk", content=garbage, headers=h)
    assert r.status_code == 422 and "not a readable zip archive" in r.json()["detail"]
    r = client.post("/v1/datasets?name=junk", content=garbage * 3, headers=h)
    assert r.status_code == 413 and "INCO_MAX_UPLOAD_BYTES" in r.json()["detail"]
    r = client.post("/v1/datasets?name=junk", content=iter([garbage] * 3), headers=h)
    assert r.status_code == 413 and "INCO_MAX_UPLOAD_BYTES" in r.json()["detail"]
    r = client.post("/v1/datasets", content=b"{" + b" " * 4096 + b"}", headers=auth(token))  # JSON: 2 KiB
    assert r.status_code == 413 and "INCO_MAX_BODY_BYTES" in r.json()["detail"]
    assert [d["name"] for d in client.get("/v1/datasets", headers=auth(token)).json()] == ["default"]
    assert not [p for p in (root / "uploads").rglob("*") if p.is_file()]  # no half-written archive left


async def _raw_asgi(app, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict]:
    """One request straight into the ASGI app, with headers exactly as given."""
    sent: list[dict] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body_out)


def test_a_content_length_that_is_not_a_number_is_400(client: TestClient, token: str) -> None:
    import anyio

    headers = [(b"content-type", b"application/json"), (b"content-length", b"lots"), (b"host", b"testserver")]
    headers.append((b"authorization", f"Bearer {token}".encode()))
    status, body = anyio.run(_raw_asgi, client.app, headers, b"{}")
    assert status == 400 and "Content-Length must be a number" in body["detail"]
    status, body = anyio.run(_raw_asgi, client.app, [*headers[:1], (b"content-length", b"99999999"), *headers[2:]], b"")
    assert status == 413


# -- data set paths --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../", "outside the server's data root"),
        ("..", "outside the server's data root"),
        ("small/../../", "outside the server's data root"),
        ("/etc", "outside the server's data root"),
        ("/", "outside the server's data root"),
        ("small\x00/crazing", "NUL byte"),
        ("x" * 300, "path: "),
        ("a/" * 2000, "does not exist"),
        ("x" * 5000, "String should have at most 4096 characters"),
        ("", "String should have at least 1 character"),
    ],
)
def test_paths_outside_the_data_root_or_unusable_are_422(
    client: TestClient, token: str, small_root: Path, path: str, message: str
) -> None:
    r = client.post("/v1/datasets", json={"name": "x", "path": path}, headers=auth(token))
    assert r.status_code == 422, r.text[:300]
    assert message in r.json()["detail"] and len(r.json()["detail"]) < 1000
    assert [d["name"] for d in client.get("/v1/datasets", headers=auth(token)).json()] == ["default"]


def test_symlinks_out_of_the_data_root_are_refused(
    client: TestClient, token: str, small_root: Path, neu_path: Path, tmp_path: Path
) -> None:
    h = auth(token)
    assert client.post("/v1/datasets", json={"name": "ok", "path": "small"}, headers=h).status_code == 201
    assert client.get("/v1/datasets", headers=h).json()[1]["images"] == 6
    os.symlink(neu_path, small_root / "link-out")  # the folder itself
    (small_root / "classes-out").mkdir()
    os.symlink(neu_path / "crazing", small_root / "classes-out" / "crazing")  # a class folder
    shutil.copytree(small_root / "small" / "patches", small_root / "classes-out" / "patches")
    shutil.copytree(small_root / "small", small_root / "files-out")
    os.symlink(neu_path / "crazing" / "crazing_9.jpg", small_root / "files-out" / "crazing" / "crazing_9.jpg")
    for path, message in (
        ("link-out", "outside the server's data root"),
        ("classes-out", "symlinks out of the data root"),
        ("files-out", "1 image(s) are symlinks out of the data root"),
    ):
        r = client.post("/v1/datasets", json={"name": "x", "path": path}, headers=h)
        assert r.status_code == 422 and message in r.json()["detail"], (path, r.text)
    assert [d["name"] for d in client.get("/v1/datasets", headers=h).json()] == ["default", "ok"]


def _team_id(client: TestClient, token: str) -> int:
    with session_scope(client.app.state.engine) as s:
        return access.team_for_token(s, token=token).id


def test_another_teams_uploads_cannot_be_registered(client: TestClient, token: str, small_root: Path) -> None:
    beta = make_team(client.app.state.engine, "beta")
    ids = {"alpha": _team_id(client, token), "beta": _team_id(client, beta)}
    for team_id in ids.values():
        shutil.copytree(small_root / "small", small_root / "uploads" / str(team_id) / "mine")
    r = client.post("/v1/datasets", json={"name": "x", "path": f"uploads/{ids['alpha']}/mine"}, headers=auth(beta))
    assert r.status_code == 422 and "another team's upload" in r.json()["detail"]
    r = client.post("/v1/datasets", json={"name": "x", "path": f"uploads/{ids['beta']}/mine"}, headers=auth(beta))
    assert r.status_code == 201, r.text  # its own upload folder is fine
    for path in ("uploads", "."):
        r = client.post("/v1/datasets", json={"name": "y", "path": path}, headers=auth(beta))
        assert r.status_code == 422 and "uploads of every team" in r.json()["detail"], path


def test_nothing_stored_on_postgresql_either(pg_url: str, tmp_path: Path, small_root: Path, redis_db: Redis) -> None:
    """A sample of the cases above on PostgreSQL: a refused request leaves no row and no queue entry."""
    from tests.service_fixtures import _empty

    _empty(pg_url)
    settings = Settings(
        home=tmp_path / "pg-home",
        database_url=pg_url,
        redis_url=REDIS_TEST,
        data_root=small_root,
        queue=f"inco-test-{secrets.token_hex(3)}",
    )
    with TestClient(create_app(settings)) as client:
        token = make_team(client.app.state.engine, "alpha")
        h = auth(token)
        assert client.post("/v1/datasets", json={"name": "default", "path": "small"}, headers=h).status_code == 201
        bad = [
            _dumps({"spec": {"overrides": {"pretrain.epochs": 10**9}}}),
            _dumps({"spec": {"overrides": {"pretrain.optim.lr": NAN}}}),
            _dumps({"spec": {"resources": {"workers": 10**6}}}),
            _dumps({"spec": {"seeds": list(range(10_000))}}),
            b"{not json",
            b"[]",
            DEEP,
            json.dumps({"spec": {"overrides": {"note": "x" * (10 << 20)}}}).encode(),
        ]
        for content in bad:
            r = _post_raw(client, "/v1/jobs", content, token)
            assert r.status_code in (413, 422), (r.status_code, r.text[:300])
        for path in ("../", "/etc", "small\x00"):
            assert client.post("/v1/datasets", json={"name": "x", "path": path}, headers=h).status_code == 422
        _nothing_stored(client, token, redis_db, settings)
        assert [d["name"] for d in client.get("/v1/datasets", headers=h).json()] == ["default"]
        assert _post_raw(client, "/v1/jobs", json.dumps(SMOKE).encode(), token).status_code == 201  # the control


def test_the_depth_check_is_linear_on_hostile_strings() -> None:
    """Bodies of escaped quotes made an earlier pattern quadratic (40 KB: 11 s); 1 MiB must take well
    under a second. The bound is loose on purpose: it tells linear from quadratic, not fast from slow."""
    import time

    from server.api.limits import json_depth

    assert json_depth(b'{"a": "x\\"[[y", "b": ["[", {"c": []}]}') == 4
    for body in (b'"' + b'\\"' * (1 << 19), b'"' + b'\\"' * (1 << 19) + b"\\", b'["' + b"\\\\" * (1 << 19)):
        start = time.perf_counter()
        depth = json_depth(body)
        assert time.perf_counter() - start < 5 and depth <= 1
