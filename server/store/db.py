"""Engines, sessions and migrations of the SQL store (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic_core import from_json
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, create_engine

from server.errors import StoreUnavailable

MIGRATIONS = Path(__file__).with_name("migrations")
log = logging.getLogger("inco.store")


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` use psycopg 3; SQLite paths get their folder created."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return url


def make_engine(url: str) -> Engine:
    """An engine for the store. SQLite runs in WAL mode with a busy timeout, so the API, the worker
    and its training processes can write to one file."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        # a pool as large as the API's thread pool, so connections (and their PRAGMAs) are not reopened
        in_memory = url in ("sqlite://", "sqlite:///:memory:")  # one connection, no pool to size
        pool = {} if in_memory else {"pool_size": 20, "max_overflow": 20}
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            json_deserializer=from_json,  # JSON columns: pydantic's parser, about twice as fast as json.loads
            **pool,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a commit survives a process crash
            cur.close()

        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        connect_args={"connect_timeout": 5},
        json_deserializer=from_json,
    )


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def _alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (creates it on an empty database)."""
    try:
        command.upgrade(_alembic_config(engine), "head")
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot migrate the store at {engine.url!r}: {exc.__class__.__name__}: {exc}") from exc


class Migrator:
    """Migrates the store when the API starts, and keeps trying every ``every_s`` in a thread while
    the database is unreachable, so an API started before its database waits (answering 503 and
    saying why on /readyz) instead of exiting and being restarted in a loop."""

    def __init__(self, engine: Engine, every_s: float = 5.0) -> None:
        self.engine, self.every_s = engine, every_s
        self.ready = threading.Event()
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Migrator:
        if not self._try():
            self._thread = threading.Thread(target=self._loop, name="migrate", daemon=True)
            self._thread.start()
        return self

    def _try(self) -> bool:
        try:
            migrate(self.engine)
        except StoreUnavailable as exc:
            self.error = str(exc)
            log.warning("%s; trying again every %.0f s", exc, self.every_s)
            return False
        self.error = None
        self.ready.set()
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            if self._try():
                log.info("the store is migrated; the API is ready")
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def schema_is_current(engine: Engine) -> bool:
    script = ScriptDirectory.from_config(_alembic_config(engine))
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() == script.get_current_head()


def ping(engine: Engine) -> None:
    """Raise :class:`StoreUnavailable` when the database does not answer."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"database unreachable: {exc.__class__.__name__}") from exc
