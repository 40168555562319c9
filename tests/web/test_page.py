"""The web page's files without a browser: served at / and /web/<file> under the page's strict policy,
nothing else under /web/, no inline code, nothing from another origin, and never innerHTML."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.security import API_CSP, WEB_CSP
from server.settings import Settings
from server.web import ASSETS, FOLDER


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    """The app without its lifespan: the page's routes touch neither the database nor Redis."""
    settings = Settings(home=tmp_path, redis_url="redis://127.0.0.1:6379/15")
    yield TestClient(create_app(settings, run_migrations=False))


def test_the_page_and_its_files_carry_the_strict_policy(client: TestClient) -> None:
    for path, media in [("/", "text/html"), *((f"/web/{name}", kind.split(";")[0]) for name, kind in ASSETS.items())]:
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(media), path
        assert r.headers["content-security-policy"] == WEB_CSP, path
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["cache-control"] == "no-cache", path
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
        assert directive in WEB_CSP
    assert "unsafe" not in WEB_CSP and "http" not in WEB_CSP
    assert client.get("/v1/jobs").headers["content-security-policy"] == API_CSP  # the API keeps its own


@pytest.mark.parametrize("path", ["/web/nope.js", "/web/index.html", "/web/..%2Fapi%2Fweb.py", "/web/", "/web/a/b"])
def test_any_other_file_is_not_found(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_the_page_has_no_inline_code_and_loads_nothing_from_elsewhere() -> None:
    html = (FOLDER / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", html) == ['<script type="module" src="/web/app.js">']
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+=", html)  # no onclick= and the like
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", html)
    assert {m for m in re.findall(r"(?:src|href)=\"(/web/[^\"]+)\"", html)} == {f"/web/{n}" for n in ASSETS}
    js = (FOLDER / "app.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", js)
    assert "localStorage" not in js and "document.cookie" not in js


def test_the_page_is_left_out_of_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/web") for p in paths)


def test_an_installed_package_carries_the_page_files() -> None:
    """``pip install .`` (the Docker image) ships only what pyproject's package data names: every file
    the page serves must match one of its patterns, or the installed API answers 500 at /."""
    import fnmatch
    import tomllib

    repo = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["server.web"]
    for name in ["index.html", *ASSETS]:
        assert (FOLDER / name).is_file(), name
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{name} is not in [tool.setuptools.package-data]"
