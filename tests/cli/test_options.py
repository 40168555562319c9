"""How ``inco`` reads its options: a single-valued option given twice is refused before anything runs,
``--eval`` repeats like ``--ratio`` and ``--seed``, and the cli modules import one way (no circle)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from cli import main, service, stack
from cli.common import OnceCommand, OnceGroup, eval_modes
from inco_core.config import load_spec

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "cli"
JOB = "0" * 32


class _Ran(Exception):
    """Raised by the stand-ins below: the command got past its options and started its work."""


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """``inco ARGS`` through the real Typer app, with the first step of each command's work (reading
    the settings, opening the API client) replaced by one that raises :class:`_Ran`."""

    def ran(*args: Any, **kwargs: Any) -> None:
        raise _Ran

    experiment = types.ModuleType("inco_core.experiment")  # what inco run imports first (torch: seconds)
    experiment.Experiment = experiment.FolderBackboneStore = ran  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "inco_core.experiment", experiment)
    monkeypatch.setenv("INCO_HOME", str(tmp_path))
    monkeypatch.setattr(main, "Settings", ran)  # inco run
    monkeypatch.setattr(stack, "Settings", ran)  # serve, worker, up, down, admin
    monkeypatch.setattr(service.ApiClient, "from_env", ran)  # submit, tune, jobs, wait, results, datasets, ...
    runner = CliRunner()
    return lambda *args: runner.invoke(main.app, list(args))


# (a command line with the option once, the same option again, the error)
REPEATED = [
    (("run", "--preset", "cpu"), ("--preset", "smoke"), "--preset given twice ('cpu' and 'smoke')"),
    (("run", "--reuse"), ("--no-reuse",), "--reuse/--no-reuse given twice ('--reuse' and '--no-reuse')"),
    (("run", "--json"), ("--json",), "--json given twice"),
    (("submit", "--method", "inco"), ("--method", "simclr"), "--method given twice ('inco' and 'simclr')"),
    (("submit", "--wait"), ("--wait",), "--wait given twice"),
    (("tune", "--ratio", "1:16"), ("--ratio", "1:8"), "--ratio given twice ('1:16' and '1:8')"),
    (("results", "--eval", "linear"), ("--eval", "finetune"), "--eval given twice ('linear' and 'finetune')"),
    (("wait", JOB, "--timeout", "1"), ("--timeout=2",), "--timeout given twice ('1' and '2')"),
    (("logs", JOB, "-f"), ("--follow",), "--follow given twice"),
    (("datasets", "--json"), ("--json",), "--json given twice"),
    (("up", "--port", "8001"), ("--port", "8002"), "--port given twice ('8001' and '8002')"),
    (("admin", "token", "list", "--team", "a"), ("--team", "b"), "--team given twice ('a' and 'b')"),
]
IDS = [" ".join((*once, *again)) for once, again, _ in REPEATED]


@pytest.mark.parametrize(("once", "again", "message"), REPEATED, ids=IDS)
def test_a_single_valued_option_given_twice_is_refused(
    invoke: Any, once: tuple[str, ...], again: tuple[str, ...], message: str
) -> None:
    result = invoke(*once, *again)
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, _Ran), "the command ran"
    assert result.stderr.strip() == f"Error: {message}; give it once"


@pytest.mark.parametrize(("once", "again", "message"), REPEATED, ids=IDS)
def test_the_option_given_once_runs(invoke: Any, once: tuple[str, ...], again: tuple[str, ...], message: str) -> None:
    """The control: without the repeat, each of those command lines gets to its work."""
    result = invoke(*once)
    assert isinstance(result.exception, _Ran), result.output


def test_multi_valued_options_merge(invoke: Any) -> None:
    result = invoke(
        "run", "--ratio", "1:8", "--ratio", "1:2", "--seed", "0", "--seed", "1", "--set", "a=1", "--set", "b=2"
    )
    assert isinstance(result.exception, _Ran), result.output


def test_every_command_checks_its_options() -> None:
    """Commands and groups are the checking classes, so one added later gets the check for free."""
    seen = []

    def walk(command: Any) -> None:
        seen.append(command.name)
        assert isinstance(command, OnceGroup if isinstance(command, TyperGroup) else OnceCommand), command.name
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(main.app))
    assert {"run", "submit", "tune", "results", "up", "serve", "datasets", "token", "create"} <= set(seen)


@pytest.mark.parametrize("path", [(), ("run",), ("submit",), ("tune",), ("datasets",), ("admin", "token", "create")])
def test_help_still_works(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main.app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


# -- --eval is repeatable ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "evals"),
    [
        (None, ["finetune"]),
        (["linear", "finetune"], ["linear", "finetune"]),
        (["both"], ["finetune", "linear"]),
        (["linear", "both"], ["linear", "finetune"]),
        (["finetune", "finetune"], ["finetune"]),
    ],
)
def test_eval_modes(given: list[str] | None, evals: list[str]) -> None:
    assert eval_modes(given) == evals


def test_run_with_two_evals_runs_both(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, neu_path: Path) -> None:
    """``inco run --eval linear --eval finetune`` hands the experiment one spec with both, in that order
    (the experiment is a stand-in: no training)."""
    specs = []

    class Experiment:
        def __init__(self, spec: Any, **kwargs: Any) -> None:
            specs.append(spec)

        def run(self) -> dict[str, Any]:
            return {"results": [], "run_dir": str(tmp_path / "run")}

    fake = types.ModuleType("inco_core.experiment")
    fake.Experiment = Experiment  # type: ignore[attr-defined]
    fake.FolderBackboneStore = lambda folder: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "inco_core.experiment", fake)
    monkeypatch.setenv("INCO_HOME", str(tmp_path))
    args = ["run", "--eval", "linear", "--eval", "finetune", "--data", str(neu_path), "--json", "--device", "cpu"]
    result = CliRunner().invoke(main.app, args)
    assert result.exit_code == 0, result.output
    (spec,) = specs
    assert spec.evals == ["linear", "finetune"]
    assert json.loads(result.stdout)["run_dir"] == str(tmp_path / "run")


def test_submit_with_two_evals_sends_both(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = []

    class Api:
        def __enter__(self) -> Api:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def submit_job(self, **kwargs: Any) -> dict[str, Any]:
            sent.append(kwargs)
            return {"id": JOB, "kind": kwargs["kind"], "spec": kwargs["spec"]}

    monkeypatch.setattr(service.ApiClient, "from_env", lambda: Api())
    result = CliRunner().invoke(main.app, ["submit", "--eval", "linear", "--eval", "both", "--json"])
    assert result.exit_code == 0, result.output
    (call,) = sent
    assert call["spec"]["evals"] == ["linear", "finetune"]
    assert load_spec(call["spec"]).evals == ["linear", "finetune"]


# -- imports flow one way: main -> service / stack -> common --------------------------------------
def _cli_imports(path: Path) -> set[str]:
    """The cli modules a file imports, anywhere in it (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name.startswith("cli.")}
        elif isinstance(node, ast.ImportFrom) and node.module == "cli":
            out |= {f"cli.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cli."):
            out.add(str(node.module))
    return out


def test_no_cli_module_imports_main_and_there_is_no_circle() -> None:
    graph = {f"cli.{p.stem}": _cli_imports(p) for p in CLI.glob("*.py") if p.stem != "__init__"}
    assert not [name for name, imports in graph.items() if "cli.main" in imports]
    assert graph["cli.common"] == set()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        if name not in done:
            for imported in graph.get(name, ()):
                visit(imported, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())


@pytest.mark.parametrize("first", ["cli.service", "cli.stack", "cli.common"])
def test_each_cli_module_imports_on_its_own(first: str) -> None:
    code = f"import sys, {first}; assert 'cli.main' not in sys.modules, 'loaded cli.main'; import cli.main; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
