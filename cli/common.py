"""What every ``inco`` command module shares: the error line, the Typer app class that refuses a
single-valued option given twice, the run-spec fields of ``inco run`` and ``inco submit``, and the
writing of the pictures ``inco plot`` and ``inco results --plot`` save.

Imports flow one way: ``cli.main`` -> ``cli.service`` / ``cli.stack`` -> ``cli.common``; this module
imports no other command module."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

err_console = Console(stderr=True)

EVAL_CHOICES = {"finetune": ["finetune"], "linear": ["linear"], "both": ["finetune", "linear"]}


def fail(message: str, code: int = 1) -> NoReturn:
    """One red line on stderr, exit ``code``: the CLI never shows a traceback for a user's mistake."""
    err_console.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# -- files the commands write ----------------------------------------------------------------------
PLOT_FORMATS = ("png", "svg")
"""The formats of the pictures the API draws (``inco plot``, ``inco results --plot``)."""


def plot_format(path: Path) -> str:
    """``png`` or ``svg``, from a file name's suffix; anything else ends the command with the fix."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        fail(f"--plot takes a .png or .svg file name (got {str(path)!r}): e.g. --plot figure4.png")
    return suffix


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` (atomically); a folder that cannot be written ends the command with the fix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        fail(f"cannot write {path} ({exc.strerror or exc}): pass a file in a folder you can write to")


def writable_folder(folder: Path) -> Path:
    """``folder``, made if needed, after a test write; one that cannot be written ends the command."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".inco-plot-"):
            pass
    except OSError as exc:
        fail(f"cannot write to {folder} ({exc.strerror or exc}): pass a folder you can write to with --out")
    return folder


# -- one value per single-valued option ----------------------------------------------------------
def _option_name(option: Any) -> str:
    """``--preset``; ``--reuse/--no-reuse`` for an on/off flag."""
    first = next((o for o in option.opts if o.startswith("--")), option.opts[0])
    return "/".join([first, *option.secondary_opts[:1]])


def _refuse_repeats(parser: Any) -> None:
    """Make ``parser`` (a command's click parser) stop at the second use of a single-valued option.

    Click keeps the last value of a repeated option and drops the others without a word; this wraps
    the ``process`` step of each single-valued option (``store`` a value, ``store_const`` a flag) so the
    second one fails with both values. Options declared ``multiple`` (``list[...]`` in Typer) append
    and are left alone. ``parser`` is the private ``_OptionParser`` of Typer's copy of click (of click
    itself in older Typer): ``_long_opt``/``_short_opt`` map each option string to an object with
    ``action``, ``obj`` (the click ``Option``) and ``process(value, state)``; tests/cli/test_options.py
    fails if a release changes that."""
    seen: dict[Any, str] = {}  # click Option -> its first value
    entries = {id(e): e for e in (*parser._long_opt.values(), *parser._short_opt.values())}
    for entry in entries.values():
        option = entry.obj
        if entry.action not in ("store", "store_const") or not option.expose_value:  # --help
            continue

        def process(
            value: Any, state: Any, *, _entry: Any = entry, _original: Callable[..., None] = entry.process
        ) -> None:
            # a value as typed, or which flag: --reuse or --no-reuse
            shown = repr(value if _entry.action == "store" else (_entry._long_opts or _entry._short_opts)[0])
            if _entry.obj in seen:
                first = seen[_entry.obj]
                both = "" if first == shown and _entry.action == "store_const" else f" ({first} and {shown})"
                fail(f"{_option_name(_entry.obj)} given twice{both}; give it once")
            seen[_entry.obj] = shown
            _original(value, state)

        entry.process = process


class OnceCommand(TyperCommand):
    """A Typer command that refuses a single-valued option given twice (see :func:`_refuse_repeats`)."""

    def make_parser(self, ctx: typer.Context) -> Any:
        parser = super().make_parser(ctx)
        if not ctx.resilient_parsing:  # shell completion parses partial command lines
            _refuse_repeats(parser)
        return parser


class OnceGroup(TyperGroup):
    """A Typer group whose own options (e.g. ``inco datasets --json``) get the same check."""

    def make_parser(self, ctx: typer.Context) -> Any:
        parser = super().make_parser(ctx)
        if not ctx.resilient_parsing:
            _refuse_repeats(parser)
        return parser


class App(typer.Typer):
    """``typer.Typer`` whose groups and commands are :class:`OnceGroup` / :class:`OnceCommand`, so every
    command registered on it, now or later, refuses a repeated single-valued option."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", OnceGroup)
        super().__init__(**kwargs)

    def command(self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(name, cls=cls or OnceCommand, **kwargs)


# -- the run spec of the options -----------------------------------------------------------------
def eval_modes(given: list[str] | None) -> list[str]:
    """``--eval`` values (repeatable; ``both`` is finetune then linear) as the spec's ``evals``: in the
    order given, each once; ``finetune`` when none is given."""
    modes: list[str] = []
    for value in given or ["finetune"]:
        if value not in EVAL_CHOICES:
            fail(f"--eval must be finetune, linear or both (got {value!r})")
        modes += [mode for mode in EVAL_CHOICES[value] if mode not in modes]
    return modes


def spec_fields(
    *,
    method: str,
    ratio: list[str] | None,
    eval_: list[str] | None,
    preset: str,
    optimizer: str,
    set_: list[str] | None,
    seed: list[int] | None,
) -> dict[str, Any]:
    """The run-spec fields shared by ``inco run`` and ``inco submit``, from their options."""
    return {
        "method": method,
        "ratios": ratio or ["1:16"],
        "evals": eval_modes(eval_),
        "preset": preset,
        "optimizer": optimizer,
        "overrides": parse_overrides(set_ or []),
        "seeds": seed or [0],
    }


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key.path=value`` pairs; values are JSON when they parse (numbers, true, null, lists)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--set takes key=value, like --set pretrain.epochs=10 (got {pair!r})")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out
