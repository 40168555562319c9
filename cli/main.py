"""``inco``: the command line. ``inco run`` runs one experiment in-process, with no service."""

from __future__ import annotations

import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cli import models, plots, service, stack
from cli.common import App, err_console, fail, spec_fields
from cli.render import RichReporter, results_table
from inco_core.config import METHODS, PRESETS, load_spec
from inco_core.errors import InCoError
from inco_core.files import scan
from server.settings import Settings

app = App(
    name="inco",
    help="InCo: instance-contrast pretraining and evaluation for steel-defect recognition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """InCo: instance-contrast pretraining and evaluation for steel-defect recognition."""


@app.command()
def run(
    method: Annotated[str, typer.Option(help=f"one of {', '.join(METHODS)}")] = "inco",
    ratio: Annotated[list[str] | None, typer.Option(help="label ratio 1:N; repeat for several")] = None,
    eval_: Annotated[
        list[str] | None,
        typer.Option(
            "--eval", help="finetune, linear or both; repeat for several, run in that order", show_default="finetune"
        ),
    ] = None,
    preset: Annotated[str, typer.Option(help=f"one of {', '.join(PRESETS)}")] = "cpu",
    data: Annotated[Path | None, typer.Option(help="image folder (class sub-folders); default $INCO_DATA")] = None,
    seed: Annotated[list[int] | None, typer.Option(help="seed; repeat for several (mean and std)")] = None,
    optimizer: Annotated[str, typer.Option(help="pretraining optimiser: default or paper-literal")] = "default",
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set pretrain.epochs=10")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    out: Annotated[Path | None, typer.Option(help="run folder; default $INCO_HOME/runs/<time>-<method>")] = None,
    reuse: Annotated[bool, typer.Option(help="reuse a cached pretrained backbone when one matches")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the result JSON on stdout")] = False,
) -> None:
    """Pretrain (or reuse a backbone), evaluate at every ratio, print and save the results."""
    settings = Settings()
    data_path = data or settings.data
    if data_path is None:
        fail("no data set given: pass --data PATH (a folder of class sub-folders) or set INCO_DATA")
    fields = spec_fields(
        method=method, ratio=ratio, eval_=eval_, preset=preset, optimizer=optimizer, set_=set_, seed=seed
    )
    try:
        spec = load_spec({**fields, "data": {"path": str(data_path)}, "resources": {"device": device}})
        scan(Path(data_path))  # a missing or empty folder is said before torch loads
        # torch loads here: not for --help, nor for a spec or folder that is wrong (its error comes in a second)
        from inco_core.experiment import Experiment, FolderBackboneStore

        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_dir = out or settings.runs_dir / f"{stamp}-{method}-{uuid.uuid4().hex[:6]}"
        with RichReporter(err_console) as reporter:
            experiment = Experiment(
                spec,
                run_dir=run_dir,
                cache_dir=settings.cache_dir,
                backbones=FolderBackboneStore(settings.cache_dir / "backbones") if reuse else None,
                reporter=reporter,
            )
            result = experiment.run()
    except InCoError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        err_console.print("[yellow]Interrupted.[/]")
        raise typer.Exit(130) from None
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    console = Console()
    console.print(results_table(result))
    console.print(f"run folder: {result['run_dir']}  (result.json, checkpoints/)", highlight=False)


stack.register(app)
service.register(app)
models.register(app)
plots.register(app)

if __name__ == "__main__":  # pragma: no cover
    app()
