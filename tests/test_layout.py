"""Imports flow one way: inco_core loads no service code, and the store side never loads FastAPI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICE_PACKAGES = ("ray", "redis", "fastapi", "sqlmodel", "sqlalchemy", "rq", "typer")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_inco_core_imports_no_service_code() -> None:
    loaded = _loaded_after("import inco_core.experiment, inco_core.methods, inco_core.checkpoint")
    assert not loaded & set(SERVICE_PACKAGES), loaded & set(SERVICE_PACKAGES)


def test_settings_do_not_load_fastapi() -> None:
    loaded = _loaded_after("import server.settings")
    assert "fastapi" not in loaded and "torch" not in loaded


def test_inco_core_reads_no_environment() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "inco_core").rglob("*.py")
        if "os.environ" in p.read_text() or "getenv" in p.read_text()
    ]
    assert not offenders


def test_store_queue_and_worker_do_not_load_fastapi() -> None:
    loaded = _loaded_after("import server.store.access, server.store.db, server.queue, worker.jobs, worker.main")
    assert "fastapi" not in loaded and "starlette" not in loaded
    assert "torch" not in loaded and "ray" not in loaded  # the worker loads them only to run a job


def test_only_the_api_package_imports_fastapi() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for folder in ("server", "worker", "inco_core")
        for p in (REPO / folder).rglob("*.py")
        if "import fastapi" in p.read_text() or "from fastapi" in p.read_text()
        if "server/api" not in str(p)
    ]
    assert not offenders


def test_server_package_init_is_empty() -> None:
    assert (REPO / "server" / "__init__.py").read_text().strip() == ""


def test_commands_that_talk_to_the_service_do_not_load_torch() -> None:
    """torch costs seconds of CPU per process: `inco predict ID`, `inco submit` and the API's upload
    checks never need it (only training and `inco predict --model` do)."""
    loaded = _loaded_after("import cli.main, cli.models, cli.service, inco_core.files, server.archives")
    assert "torch" not in loaded
