"""Fixtures for the service tests: a fresh SQLite file or PostgreSQL database, a flushed Redis
database, the API in-process, teams with tokens, and one local Ray for the whole session."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from sqlalchemy import create_engine, text
from sqlmodel import SQLModel

from server.settings import Settings
from server.store import access
from server.store.db import make_engine, migrate, session_scope

PG_ADMIN = os.environ.get("INCO_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _redis_test_url() -> str:
    """Redis database 15, or under pytest-xdist one database per test process (gw0: 15, gw1: 1, gw2: 2,
    ... gw4: 4), so two processes never flush each other's. Files with a database of their own
    (5, 7, 8, 10-14) run whole in one process (``--dist loadfile``)."""
    if "INCO_TEST_REDIS" in os.environ:
        return os.environ["INCO_TEST_REDIS"]
    n = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    if n > 4:
        raise RuntimeError("at most 5 test processes share this Redis (pytest -n 5); set INCO_TEST_REDIS per process")
    return f"redis://127.0.0.1:6379/{15 if n == 0 else n}"


REDIS_TEST = _redis_test_url()


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database on the server of ``PG_ADMIN``, dropped at the end: its name."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        except Exception as exc:
            pytest.fail(f"PostgreSQL at {PG_ADMIN} is needed (scripts/services.sh starts it): {exc}")
        yield name
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def pg_host_port() -> tuple[str, int]:
    """Host and port of the PostgreSQL server of ``PG_ADMIN`` (for a proxy in front of it)."""
    host, port = PG_ADMIN.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[1].split(":")
    return host, int(port)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of its own for this test session, dropped at the end."""
    with scratch_database("inco_test") as name:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"


def _empty(url: str) -> None:
    engine = make_engine(url)
    migrate(engine)
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store suite runs on both databases: a new SQLite file, or the session's PostgreSQL
    database emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'inco.db'}"
    url = request.getfixturevalue("pg_url")
    _empty(url)
    return url


@pytest.fixture
def redis_db() -> Redis:
    redis = Redis.from_url(REDIS_TEST)
    redis.flushdb()
    return redis


@pytest.fixture
def settings(tmp_path: Path, db_url: str, redis_db: Redis, neu_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=db_url,
        redis_url=REDIS_TEST,
        data_root=neu_path.parent,
        queue=f"inco-test-{secrets.token_hex(3)}",
    )


@pytest.fixture
def engine(settings: Settings):
    engine = make_engine(settings.db_url)
    migrate(engine)
    yield engine
    engine.dispose()


ALL_SCOPES = ["read", "submit", "admin", "predict"]


def make_team(engine, name: str, scopes: list[str] | None = None) -> str:
    """A token of team ``name`` (created when new) with ``scopes`` (default: every scope)."""
    with session_scope(engine) as s:
        return access.create_token(s, team=access.ensure_team(s, name=name), scopes=scopes or ALL_SCOPES)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The API in-process on ``settings`` (its lifespan runs the migrations)."""
    from server.api.app import create_app

    with TestClient(create_app(settings)) as c:
        yield c


def team_with_dataset(client: TestClient, name: str = "alpha", *, path: str = "neu-cls") -> str:
    """A token (every scope) of a new team that has ``path`` (under the data root) registered as
    data set ``default``."""
    token = make_team(client.app.state.engine, name)
    r = client.post("/v1/datasets", json={"name": "default", "path": path}, headers=auth(token))
    assert r.status_code == 201, r.text
    return token
