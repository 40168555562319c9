"""Data set archive uploads (``POST /v1/datasets`` with a zip, tar or tar.gz) against the real API:
real archives of real NEU-CLS images, built in tmp. Good ones register with the right counts; every
hostile or broken one is refused with a clear message and leaves nothing on disk or in the store."""

from __future__ import annotations

import io
import secrets
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from typer.testing import CliRunner

from cli.client import ApiClient, ClientError, archive_type
from server import archives
from server.errors import Conflict, TooLarge
from server.settings import Settings
from server.store import access
from server.store.db import session_scope
from tests.service_fixtures import REDIS_TEST, auth, make_team

pytestmark = pytest.mark.integration
CLASSES = ("crazing", "inclusion", "scratches")
ZIP, TAR, TGZ = "application/zip", "application/x-tar", "application/gzip"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def settings(tmp_path: Path, root: Path, redis_db: Redis) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'inco.db'}",
        redis_url=REDIS_TEST,
        data_root=root,
        queue=f"inco-test-{secrets.token_hex(3)}",
    )


@pytest.fixture
def token(client: TestClient) -> str:
    return make_team(client.app.state.engine, "alpha")


@pytest.fixture
def images(neu_path: Path) -> dict[str, bytes]:
    """4 real images of each of 3 classes: {'crazing/crazing_1.jpg': bytes, ...}."""
    return {f"{c}/{c}_{i}.jpg": (neu_path / c / f"{c}_{i}.jpg").read_bytes() for c in CLASSES for i in range(1, 5)}


# -- archive builders ---------------------------------------------------------------------------------
def make_zip(path: Path, files: dict[str, bytes], *, links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def make_tar(path: Path, files: dict[str, bytes], *, gz: bool = True, special: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in special:
            tf.addfile(info)
    return path


def _special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def upload(client: TestClient, token: str, archive: Path, name: str = "up", content_type: str = ZIP):
    return client.post(
        f"/v1/datasets?name={name}", content=archive.read_bytes(), headers={**auth(token), "content-type": content_type}
    )


def _team_id(client: TestClient, token: str) -> int:
    with session_scope(client.app.state.engine) as s:
        return access.team_for_token(s, token=token).id


def assert_nothing_left(client: TestClient, token: str, root: Path) -> None:
    """No data set row, no file under the uploads folder, no temporary folder."""
    assert client.get("/v1/datasets", headers=auth(token)).json() == []
    uploads = root / "uploads"
    if uploads.exists():
        assert [p for p in uploads.rglob("*") if p.is_file() or p.is_symlink()] == []
        team_dir = uploads / str(_team_id(client, token))
        assert not team_dir.exists() or list(team_dir.iterdir()) == []


# -- good archives -------------------------------------------------------------------------------------
def test_a_zip_registers_and_is_listed_with_its_counts(
    client: TestClient, token: str, root: Path, images: dict[str, bytes], tmp_path: Path
) -> None:
    wrapped = {f"neu-small/{k}": v for k, v in images.items()}  # zipped with its folder: unwrapped
    r = upload(client, token, make_zip(tmp_path / "a.zip", wrapped), name="zipped")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert (ds["name"], ds["images"], ds["classes"]) == ("zipped", 12, sorted(CLASSES))
    folder = root / "uploads" / str(_team_id(client, token)) / "zipped"
    assert Path(ds["path"]) == folder.resolve()
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg")) == sorted(images)
    assert (folder / "crazing" / "crazing_1.jpg").read_bytes() == images["crazing/crazing_1.jpg"]
    listed = client.get("/v1/datasets", headers=auth(token)).json()
    assert [(d["name"], d["images"], len(d["classes"])) for d in listed] == [("zipped", 12, 3)]
    assert list((root / "uploads" / ".incoming").iterdir()) == []  # the streamed archive is gone
    assert [p.name for p in folder.parent.iterdir()] == ["zipped"]  # no temporary folder left
    # the upload is a data set like any other: a job can use it
    r = client.post("/v1/jobs", json={"spec": {"preset": "smoke", "data": {"dataset": "zipped"}}}, headers=auth(token))
    assert r.status_code == 201 and r.json()["spec"]["data"]["path"] == ds["path"]


@pytest.mark.parametrize(("gz", "content_type"), [(True, TGZ), (False, TAR)])
def test_a_tar_or_tar_gz_registers(
    client: TestClient,
    token: str,
    images: dict[str, bytes],
    tmp_path: Path,
    gz: bool,
    content_type: str,
) -> None:
    extra = {"__MACOSX/crazing/._crazing_1.jpg": b"resource fork", "crazing/.DS_Store": b"finder"}  # left out
    r = upload(client, token, make_tar(tmp_path / "a.tar", {**images, **extra}, gz=gz), content_type=content_type)
    assert r.status_code == 201, r.text
    assert (r.json()["images"], r.json()["classes"]) == (12, sorted(CLASSES))
    assert not list(Path(r.json()["path"]).rglob(".DS_Store")) and not (Path(r.json()["path"]) / "__MACOSX").exists()


# -- refused archives ------------------------------------------------------------------------------------
Build = Callable[[Path, dict[str, bytes]], Path]
CASES: list[tuple[str, Build, str, int, list[str]]] = [
    (
        "zip-slip",
        lambda p, im: make_zip(p, {**im, "../evil.jpg": b"x", "crazing/../../evil2.jpg": b"x"}),
        ZIP,
        422,
        ["'..' in the path (2)", "'../evil.jpg'", "'crazing/../../evil2.jpg'"],
    ),
    (
        "tar-slip",
        lambda p, im: make_tar(p, {**im, "../../evil.jpg": b"x"}),
        TGZ,
        422,
        ["'..' in the path", "'../../evil.jpg'"],
    ),
    (
        "absolute path",
        lambda p, im: make_zip(p, {**im, "/tmp/evil.jpg": b"x", "C:/evil.jpg": b"x"}),
        ZIP,
        422,
        ["absolute path (2)", "'/tmp/evil.jpg'"],
    ),
    (
        "zip symlink",
        lambda p, im: make_zip(p, im, links={"crazing/link.jpg": "/etc/passwd"}),
        ZIP,
        422,
        ["symlink (1): 'crazing/link.jpg'"],
    ),
    (
        "tar symlink and hardlink",
        lambda p, im: make_tar(
            p,
            im,
            special=[
                _special("crazing/s.jpg", tarfile.SYMTYPE, "/etc/passwd"),
                _special("crazing/h.jpg", tarfile.LNKTYPE, "crazing/crazing_1.jpg"),
            ],
        ),
        TGZ,
        422,
        ["symlink (1): 'crazing/s.jpg'", "hardlink (1): 'crazing/h.jpg'"],
    ),
    (
        "device and fifo",
        lambda p, im: make_tar(
            p, im, special=[_special("crazing/dev.jpg", tarfile.CHRTYPE), _special("fifo.jpg", tarfile.FIFOTYPE)]
        ),
        TGZ,
        422,
        ["device or special file (2)", "'crazing/dev.jpg'", "'fifo.jpg'"],
    ),
    (
        "non-images",
        lambda p, im: make_zip(p, {**im, "crazing/notes.txt": b"hi", "run.sh": b"rm -rf /", "model.pt": b"\0"}),
        ZIP,
        422,
        ["not an image", "'crazing/notes.txt'", "'run.sh'", "'model.pt'", "(3)"],
    ),
    (
        "many non-images",
        lambda p, im: make_zip(p, {**im, **{f"doc/{i:02d}.pdf": b"%PDF" for i in range(30)}}),
        ZIP,
        422,
        ["not an image", "(30)", "'doc/19.pdf' and 10 more"],
    ),
    (
        "corrupt zip",
        lambda p, im: p.write_bytes(make_zip(p, im).read_bytes()[:-300]) and p,
        ZIP,
        422,
        ["not a readable zip archive"],
    ),
    (
        "garbage as tar.gz",
        lambda p, im: p.write_bytes(b"\x1f\x8b" + b"not gzip at all" * 100) and p,
        TGZ,
        422,
        ["the upload is not a readable tar archive"],
    ),
    (
        "truncated tar.gz",
        lambda p, im: p.write_bytes(make_tar(p, im).read_bytes()[:20_000]) and p,
        TGZ,
        422,
        ["the archive is corrupt"],
    ),
    (
        "a zip sent as tar",
        lambda p, im: make_zip(p, im),
        TAR,
        422,
        ["not a readable tar archive"],
    ),
    (
        "zip bomb",
        lambda p, im: make_zip(p, {**im, "crazing/bomb.bmp": b"\0" * (8 << 20)}),
        ZIP,
        413,
        ["'crazing/bomb.bmp' is compressed", "zip bomb"],
    ),
    (
        "one class",
        lambda p, im: make_zip(p, {k: v for k, v in im.items() if k.startswith("crazing/")}),
        ZIP,
        422,
        ["holds one class (crazing); a classifier needs at least two"],
    ),
    (
        "no images",
        lambda p, im: make_zip(p, {"empty/": b""}),
        ZIP,
        422,
        ["archive: no class folders"],
    ),
    (
        "a repeated entry",
        lambda p, im: make_zip(p, {**im, "crazing/crazing_1.jpg/x.jpg": b"x"}),
        ZIP,
        422,
        ["'crazing/crazing_1.jpg/x.jpg' appears twice in the archive, or as both a file and a folder"],
    ),
]


@pytest.mark.parametrize(("label", "build", "content_type", "code", "messages"), CASES, ids=[c[0] for c in CASES])
def test_hostile_or_broken_archives_are_refused_and_leave_nothing(
    client: TestClient,
    token: str,
    root: Path,
    images: dict[str, bytes],
    tmp_path: Path,
    label: str,
    build: Build,
    content_type: str,
    code: int,
    messages: list[str],
) -> None:
    archive = build(tmp_path / "bad.archive", images)
    r = upload(client, token, archive, content_type=content_type)
    assert r.status_code == code, r.text
    for message in messages:
        assert message in r.json()["detail"], (message, r.json()["detail"])
    assert len(r.json()["detail"]) < 3000
    assert not (tmp_path / "evil.jpg").exists() and not (root / "evil.jpg").exists()
    assert not Path("/tmp/evil.jpg").exists()
    assert_nothing_left(client, token, root)


def test_limits_on_files_and_bytes(
    client: TestClient, token: str, settings: Settings, root: Path, images: dict[str, bytes], tmp_path: Path
) -> None:
    archive = make_zip(tmp_path / "a.zip", images)
    client.app.state.settings = settings.model_copy(update={"max_upload_files": 5})
    r = upload(client, token, archive)
    assert r.status_code == 413 and "more than 5 entries (INCO_MAX_UPLOAD_FILES)" in r.json()["detail"]
    assert_nothing_left(client, token, root)
    client.app.state.settings = settings.model_copy(update={"max_upload_bytes": archive.stat().st_size - 1})
    r = upload(client, token, archive)
    assert r.status_code == 413 and "INCO_MAX_UPLOAD_BYTES" in r.json()["detail"]
    chunks = iter([archive.read_bytes()[:4096], archive.read_bytes()[4096:]])  # no Content-Length
    r = client.post("/v1/datasets?name=up", content=chunks, headers={**auth(token), "content-type": ZIP})
    assert r.status_code == 413 and "INCO_MAX_UPLOAD_BYTES" in r.json()["detail"]
    assert_nothing_left(client, token, root)
    client.app.state.settings = settings.model_copy(update={"max_upload_bytes": archive.stat().st_size})
    assert upload(client, token, archive).status_code == 201  # exactly at the limit is fine


def test_the_unpacked_size_is_capped_whatever_the_headers_say(images: dict[str, bytes], tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tar.gz", images)
    total = sum(len(v) for v in images.values())
    with pytest.raises(TooLarge, match="unpacks to more than"):
        archives.extract(archive, "tar.gz", tmp_path / "out", max_files=100, max_bytes=total - 1)
    assert archives.extract(archive, "tar.gz", tmp_path / "out2", max_files=100, max_bytes=total) == 12


def test_request_errors_name_the_fix(
    client: TestClient, token: str, root: Path, images: dict[str, bytes], tmp_path: Path
) -> None:
    archive = make_zip(tmp_path / "a.zip", images)
    h = {**auth(token), "content-type": ZIP}
    r = client.post("/v1/datasets", content=archive.read_bytes(), headers=h)
    assert r.status_code == 422 and "?name=NAME" in r.json()["detail"]
    r = client.post("/v1/datasets?name=../x", content=archive.read_bytes(), headers=h)
    assert r.status_code == 422 and "String should match pattern" in r.json()["detail"]
    r = client.post("/v1/datasets?name=up", content=b"", headers=h)
    assert r.status_code == 422 and "the archive is empty" in r.json()["detail"]
    for content_type in ("text/plain", "application/octet-stream", "multipart/form-data; boundary=x"):
        r = upload(client, token, archive, content_type=content_type)
        assert r.status_code == 415, (content_type, r.text)
        assert "application/zip, application/x-tar or application/gzip" in r.json()["detail"]
    r = client.post("/v1/datasets?name=up", content=archive.read_bytes(), headers={"content-type": ZIP})
    assert r.status_code == 401
    assert_nothing_left(client, token, root)


def test_an_existing_name_is_409_and_the_first_upload_stays(
    client: TestClient, token: str, root: Path, images: dict[str, bytes], tmp_path: Path
) -> None:
    archive = make_zip(tmp_path / "a.zip", images)
    assert upload(client, token, archive, name="mine").status_code == 201
    folder = root / "uploads" / str(_team_id(client, token)) / "mine"
    before = sorted(p.name for p in folder.rglob("*"))
    smaller = make_zip(tmp_path / "b.zip", {k: v for k, v in images.items() if not k.startswith("scratches/")})
    r = upload(client, token, smaller, name="mine")
    assert r.status_code == 409 and "exists already" in r.json()["detail"]
    assert sorted(p.name for p in folder.rglob("*")) == before
    # a folder left behind without a row (a crash between rename and commit) is not overwritten
    shutil.copytree(folder, folder.parent / "orphan")
    r = upload(client, token, smaller, name="orphan")
    assert r.status_code == 409 and "left behind" in r.json()["detail"]
    # the same name in another team is another data set
    beta = make_team(client.app.state.engine, "beta")
    r = upload(client, beta, smaller, name="mine")
    assert r.status_code == 201 and r.json()["images"] == 8
    assert [d["name"] for d in client.get("/v1/datasets", headers=auth(token)).json()] == ["mine"]


def test_openapi_documents_both_bodies(client: TestClient) -> None:
    op = client.get("/openapi.json").json()["paths"]["/v1/datasets"]["post"]
    content = op["requestBody"]["content"]
    assert set(content) == {"application/json", ZIP, TAR, TGZ}
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/DatasetCreate"}
    assert content[ZIP]["schema"] == {"type": "string", "format": "binary"}
    assert [p["name"] for p in op["parameters"]] == ["name"]


# -- the CLI -----------------------------------------------------------------------------------------------
@pytest.fixture
def cli(client: TestClient, token: str, monkeypatch: pytest.MonkeyPatch) -> Callable[..., object]:
    """``inco ...`` in-process, its requests going to the in-process API."""
    from cli.main import app

    def in_process(cls: type[ApiClient], settings: object = None) -> ApiClient:
        api = ApiClient("http://testserver", token)
        api.http.close()
        api.http = TestClient(client.app, headers=auth(token))
        return api

    monkeypatch.setattr(ApiClient, "from_env", classmethod(in_process))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_cli_upload(cli: Callable[..., object], images: dict[str, bytes], tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "steel.tar.gz", images)
    result = cli("datasets", "upload", "steel", str(archive))
    assert result.exit_code == 0, result.output
    assert "uploaded data set steel: 12 images, 3 classes" in result.output
    listed = cli("datasets", "--json")
    assert '"name": "steel"' in listed.output and '"images": 12' in listed.output
    result = cli("datasets", "upload", "steel", str(archive))
    assert result.exit_code == 1 and "Error: data set 'steel' exists already" in result.output
    bad = make_zip(tmp_path / "bad.zip", {**images, "../evil.jpg": b"x"})
    result = cli("datasets", "upload", "other", str(bad))
    assert result.exit_code == 1 and "'..' in the path" in result.output and "Traceback" not in result.output
    result = cli("datasets", "upload", "other", str(tmp_path / "missing.zip"))
    assert result.exit_code == 1 and "no file" in result.output
    (tmp_path / "x.rar").write_bytes(b"rar")
    result = cli("datasets", "upload", "other", str(tmp_path / "x.rar"))
    assert result.exit_code == 1 and "is not a .zip, .tar or .tar.gz file" in result.output


def test_archive_types_from_names() -> None:
    assert archive_type(Path("a.ZIP")) == ZIP and archive_type(Path("a.tar")) == TAR
    assert archive_type(Path("a.tar.gz")) == TGZ == archive_type(Path("a.tgz"))
    with pytest.raises(ClientError, match=r"not a \.zip"):
        archive_type(Path("a.7z"))


def test_a_full_disk_is_503_and_leaves_nothing(
    client: TestClient, token: str, root: Path, images: dict[str, bytes], tmp_path: Path
) -> None:
    """The file size limit of the process (RLIMIT_FSIZE) makes writing the upload fail as a full disk would."""
    import resource
    import signal

    archive = make_zip(tmp_path / "a.zip", images)
    content = archive.read_bytes()
    assert len(content) > 128 << 10
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        r = client.post("/v1/datasets?name=up", content=content, headers={**auth(token), "content-type": ZIP})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert r.status_code == 503, r.text
    assert "cannot store the upload" in r.json()["detail"] and r.headers["retry-after"]
    assert_nothing_left(client, token, root)
    assert upload(client, token, archive).status_code == 201  # and it works once there is room


def test_a_name_taken_while_unpacking_removes_the_folder(
    client: TestClient, token: str, root: Path, settings: Settings, images: dict[str, bytes], tmp_path: Path
) -> None:
    """A request alongside registers the name after the first check: the row wins, the folder goes."""
    from server.api.routes.datasets import _register_archive

    archive = make_zip(tmp_path / "a.zip", images)
    team_id = _team_id(client, token)
    with session_scope(client.app.state.engine) as s:
        access.add_dataset(s, team_id=team_id, name="raced", path=str(root), images=1, classes=["a", "b"])
    with session_scope(client.app.state.engine) as s:
        team = access.team_for_token(s, token=token)
        with pytest.raises(Conflict, match="exists already"):
            _register_archive(s, team, "raced", archive, "zip", settings)
    team_dir = root / "uploads" / str(team_id)
    assert list(team_dir.iterdir()) == []  # neither the data set folder nor the temporary one
    assert [d["name"] for d in client.get("/v1/datasets", headers=auth(token)).json()] == ["raced"]


def test_a_tar_gz_with_a_header_bomb_is_refused(
    client: TestClient, token: str, root: Path, images: dict[str, bytes], tmp_path: Path
) -> None:
    """A GNU long name of 20 MiB compresses to kilobytes; tarfile would read it whole into memory."""
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tf:
        for name, data in images.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("crazing/" + "x" * (20 << 20) + ".jpg")
        tf.addfile(info, io.BytesIO(b""))
    assert path.stat().st_size < 1 << 20
    r = upload(client, token, path, content_type=TGZ)
    assert r.status_code == 413 and "entry header over 16 MiB" in r.json()["detail"]
    assert_nothing_left(client, token, root)


def test_skipped_entries_count_towards_the_unpacked_size(images: dict[str, bytes], tmp_path: Path) -> None:
    """Refused entries are not written, but tarfile still decompresses them: their sizes count too."""
    archive = make_tar(tmp_path / "a.tar.gz", {**images, "big.txt": b"\0" * (4 << 20)})
    with pytest.raises(TooLarge, match="unpacks to more than"):
        archives.extract(archive, "tar.gz", tmp_path / "out", max_files=100, max_bytes=1 << 20)
