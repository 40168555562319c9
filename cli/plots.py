"""``inco plot JOB --out DIR``: a job's pictures, as the API draws them (server/plots.py), written to
files (``inco results --plot FILE``, in cli/service.py, writes Figure 4 the same way). The CLI draws
nothing itself, so a picture is the same wherever it is looked at (the web page, the API, these files)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cli.client import ApiClient, ClientError
from cli.common import PLOT_FORMATS, App, err_console, fail, writable_folder, write_file
from cli.service import _api


def ratio_slug(ratio: str) -> str:
    """``1r16`` for ``1:16``: a file name without a colon, as the model files are named."""
    return ratio.replace(":", "r")


def job_plots(api: ApiClient, job: dict[str, Any], out: Path, fmt: str) -> list[Path]:
    """Every picture of ``job`` the API can draw now, written under ``out``: the training curves, a
    confusion matrix per result row, an embedding map per seed that has a backbone, a tune job's trials.
    Returns the files written; what is not there yet is said on stderr."""
    job_id = job["id"]
    written: list[Path] = []

    def save(name: str, data: bytes) -> None:
        path = out / f"{name}.{fmt}"
        write_file(path, data)
        written.append(path)
        Console(highlight=False, soft_wrap=True).print(str(path))

    if api.metrics(job_id):
        save("curves", api.job_plot(job_id, "curves", fmt))
    else:
        err_console.print(f"no training curves: job {job_id} has no metrics yet ({job['status']})", highlight=False)
    if job["kind"] == "tune":
        if api.trials(job_id):
            save("trials", api.job_plot(job_id, "trials", fmt))
        else:
            err_console.print(f"no trials plot: tune job {job_id} has no trials yet", highlight=False)
        return written
    rows = api.job_results(job_id)
    for row in rows:
        params = {"ratio": row["ratio"], "eval": row["eval"], "seed": row["seed"]}
        name = f"confusion-{ratio_slug(row['ratio'])}-{row['eval']}-seed{row['seed']}"
        save(name, api.job_plot(job_id, "confusion", fmt, **params))
    if not rows:
        err_console.print(f"no confusion matrices: job {job_id} has no results yet ({job['status']})", highlight=False)
    if job["status"] == "queued":
        return written
    for seed in job["spec"].get("seeds", [0]):
        err_console.print(f"embedding map of seed {seed}: t-SNE of the test images (seconds, once)...", highlight=False)
        try:
            data = api.job_plot(job_id, "embedding", fmt, seed=seed)
        except ClientError as exc:
            if exc.status not in (404, 410):
                raise
            err_console.print(f"no embedding map of seed {seed}: {exc}", highlight=False, soft_wrap=True)
            continue
        save(f"embedding-seed{seed}", data)
    return written


def plot(
    job_id: Annotated[str, typer.Argument(help="the job's id (`inco jobs` lists them)", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write the pictures into (made if needed)")] = Path(
        "."
    ),
    format_: Annotated[str, typer.Option("--format", help="png or svg")] = "png",
) -> None:
    """Write a job's pictures into a folder: curves (training curves), confusion-<ratio>-<eval>-seed<N> (one
    per result row), embedding-seed<N> (a t-SNE map of the backbone's embedding of the test images, per
    seed), trials (tune jobs). Prints each file written."""
    if format_ not in PLOT_FORMATS:
        fail(f"--format must be png or svg (got {format_!r})")
    folder = writable_folder(out)
    with _api() as api:
        job = api.get_job(job_id)
        written = job_plots(api, job, folder, format_)
    if not written:
        fail(
            f"job {job_id} ({job['status']}) has nothing to plot yet: no metrics, results or backbone; "
            f"follow it with `inco wait {job_id}`"
        )
    err_console.print(f"wrote {len(written)} picture(s) of job {job_id} to {folder}", highlight=False, soft_wrap=True)


def register(app: App) -> None:
    app.command()(plot)
