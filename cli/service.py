"""The commands that talk to the InCo API: ``inco submit``, ``jobs``, ``status``, ``wait``, ``logs``,
``cancel``, ``results`` and ``datasets``. The API is found through ``INCO_API_URL``/``INCO_TOKEN`` or
the local stack that ``inco up`` started."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cli.client import ApiClient, ClientError
from cli.common import App, err_console, fail, plot_format, spec_fields, write_file
from cli.render import (
    STATUS_STYLE,
    JobProgress,
    datasets_table,
    job_details,
    job_results_table,
    leaderboard_tables,
    log_line,
    trials_table,
)

FINISHED = ("succeeded", "failed", "canceled")
POLL_S = 1.0
TIMEOUT_EXIT = 2
CSV_FIELDS = ("dataset", "preset", "setup", "eval", "variant", "method", "ratio", "mean", "std", "count")
JobId = Annotated[str, typer.Argument(help="the job's id (`inco jobs` lists them)", show_default=False)]
JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON on stdout")]


# -- helpers -------------------------------------------------------------------------------------
@contextmanager
def _api() -> Iterator[ApiClient]:
    """A client of the API; a failed request ends the command with one red line."""
    try:
        with ApiClient.from_env() as api:
            yield api
    except ClientError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        err_console.print("[yellow]Interrupted.[/]")
        raise typer.Exit(130) from None


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def _status_line(job: dict[str, Any]) -> str:
    line = f"job {job['id']}: [{_style(job['status'])}]{job['status']}[/]"
    if job["status"] == "queued":
        line += " (waiting for a worker; `inco up` starts one)"
    elif job["status"] == "running" and job.get("worker"):
        line += f" on {job['worker']} (attempt {job['attempts']})"
    return line


def _style(status: str) -> str:
    return STATUS_STYLE.get(status, "bold")


# -- following a job -----------------------------------------------------------------------------
class _Timeout(Exception):
    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job


def _follow(api: ApiClient, job_id: str, timeout_s: float | None) -> dict[str, Any]:
    """Poll the job (and its metrics) until it ends; status changes and live bars go to stderr."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    with JobProgress(err_console) as progress:
        while True:
            job = api.get_job(job_id)
            if job["status"] != last:
                progress.note(_status_line(job))
                last = job["status"]
            if job["status"] != "queued":
                progress.show(api.metrics(job_id))
            if job["status"] in FINISHED:
                return job
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise _Timeout(job)
            time.sleep(POLL_S if left is None else min(POLL_S, left))


def _wait_and_report(api: ApiClient, job_id: str, timeout_s: float | None, as_json: bool) -> None:
    """Follow a job; print its results (table or JSON) and exit 0 / 1 (failed, canceled) / 2 (timeout)."""
    try:
        job = _follow(api, job_id, timeout_s)
    except _Timeout as exc:
        job = exc.job
        fail(
            f"job {job_id} is still {job['status']} after {timeout_s:g} s: keep waiting with "
            f"`inco wait {job_id}`, or stop it with `inco cancel {job_id}`",
            TIMEOUT_EXIT,
        )
    if job["kind"] == "tune":
        trials = api.trials(job_id)
        if as_json:
            _print_json({"job": job, "trials": trials})
        elif trials:
            Console().print(trials_table(trials, title=f"tune job {job_id}: trials, best first"))
        if job["status"] == "succeeded" and not as_json:
            err_console.print(f"submit the best settings with `inco submit --from-tune {job_id} --ratio 1:N`")
        results: list[dict[str, Any]] = trials
    else:
        results = api.job_results(job_id)
        if as_json:
            _print_json({"job": job, "results": results})
        elif results:
            Console().print(job_results_table(results))
    if job["status"] == "failed":
        fail(f"job {job_id} failed: {job.get('error') or 'no error was recorded'} (see `inco logs {job_id}`)")
    if job["status"] == "canceled":
        fail(f"job {job_id} was canceled" + (f": {job['error']}" if job.get("error") else ""))
    if not results and not as_json:
        err_console.print(f"job {job_id} succeeded; it has no result rows ({job['kind']} job)", highlight=False)


# -- commands ------------------------------------------------------------------------------------
def submit(
    method: Annotated[
        str | None, typer.Option(help="inco, simclr, mocov2, simsiam or supervised", show_default="inco")
    ] = None,
    ratio: Annotated[list[str] | None, typer.Option(help="label ratio 1:N; repeat for several")] = None,
    eval_: Annotated[
        list[str] | None,
        typer.Option(
            "--eval", help="finetune, linear or both; repeat for several, run in that order", show_default="finetune"
        ),
    ] = None,
    preset: Annotated[str | None, typer.Option(help="paper, cpu or smoke", show_default="cpu")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="a data set registered with `inco datasets add`", show_default="default")
    ] = None,
    seed: Annotated[list[int] | None, typer.Option(help="seed; repeat for several (mean and std)")] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="pretraining optimiser: default or paper-literal", show_default="default")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set pretrain.epochs=10")] = None,
    kind: Annotated[
        str | None, typer.Option(help="experiment, pretrain or finetune; default finetune with --pretrained")
    ] = None,
    pretrained: Annotated[str | None, typer.Option(help="finetune: the pretrain job whose backbones to use")] = None,
    from_tune: Annotated[
        str | None,
        typer.Option(
            "--from-tune",
            help="run the best trial of this tune job's search: its method, preset, data set and settings "
            "unless given here",
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda", show_default="auto")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Ray Train workers", show_default="1")] = None,
    gpus_per_worker: Annotated[
        float | None, typer.Option(min=0, help="GPUs each worker asks for", show_default="0")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job until it ends, like `inco wait`")] = False,
    timeout: Annotated[float | None, typer.Option(min=0, help="with --wait: give up after this many seconds")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Submit a job to the service; prints its id on stdout (ID=$(inco submit ...))."""
    spec = _spec(
        method=method,
        ratio=ratio,
        eval_=eval_,
        preset=preset,
        dataset=dataset,
        seed=seed,
        optimizer=optimizer,
        set_=set_,
        device=device,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        inherit=from_tune is not None,
    )
    if from_tune and (kind not in (None, "experiment") or pretrained):
        fail("--from-tune submits an experiment: leave out --kind and --pretrained")
    kind = kind or ("finetune" if pretrained else "experiment")
    with _api() as api:
        job = api.submit_job(kind=kind, spec=spec, pretrained_job=pretrained, from_tune=from_tune)
        _submitted(api, job, wait=wait, timeout=timeout, as_json=as_json)


def _spec(
    *,
    method: str | None,
    ratio: list[str] | None,
    eval_: list[str] | None,
    preset: str | None,
    dataset: str | None,
    seed: list[int] | None,
    optimizer: str | None,
    set_: list[str] | None,
    device: str | None,
    workers: int | None,
    gpus_per_worker: float | None,
    inherit: bool = False,
) -> dict[str, Any]:
    """The run spec of the options. With ``inherit`` (``--from-tune``) the options left out are left
    out of the spec too, so the service takes them from the tune job."""
    spec = spec_fields(
        method=method or "inco",
        ratio=ratio,
        eval_=eval_,
        preset=preset or "cpu",
        optimizer=optimizer or "default",
        set_=set_,
        seed=seed,
    )
    resources = {
        k: v
        for k, v in (("device", device), ("workers", workers), ("gpus_per_worker", gpus_per_worker))
        if v is not None
    }
    if inherit:
        for key, given in (("method", method), ("preset", preset), ("optimizer", optimizer)):
            if given is None:
                del spec[key]
        if dataset is not None:
            spec["data"] = {"dataset": dataset}
        if resources:
            spec["resources"] = resources
        return spec
    spec["data"] = {"dataset": dataset or "default"}
    spec["resources"] = {"device": "auto", "workers": 1, "gpus_per_worker": 0, **resources}
    return spec


def _submitted(api: ApiClient, job: dict[str, Any], *, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Print a new job's id (or JSON) and a summary line; with ``wait``, follow it to the end."""
    if as_json and not wait:
        _print_json(job)
    elif not as_json:
        sys.stdout.write(job["id"] + "\n")
        sys.stdout.flush()
    spec = job["spec"]
    what = f"{job['kind']} job {job['id']} ({spec['method']}, {', '.join(spec['ratios'])}, {spec['preset']} preset"
    if job.get("tune"):
        what += f", {job['tune']['trials']} trials"
    if job.get("outputs", {}).get("from_tune"):
        picked = job["outputs"]["from_tune"]
        what += f", trial {picked['trial']} of tune job {picked['job']}"
    err_console.print(
        f"submitted {what})" + ("" if wait else f": follow it with `inco wait {job['id']}`"),
        highlight=False,
        soft_wrap=True,
    )
    if wait:
        _wait_and_report(api, job["id"], timeout, as_json)


def tune(
    ratio: Annotated[str, typer.Option(help="the label ratio 1:N to tune for")] = "1:16",
    trials: Annotated[int, typer.Option(min=1, max=500, help="points of the search space to try")] = 20,
    method: Annotated[str, typer.Option(help="inco (all parameters), or simclr, mocov2, simsiam (lr only)")] = "inco",
    param: Annotated[
        list[str] | None,
        typer.Option(
            help="what to search: t1, t2, a_f, views, lr; repeat", show_default="all five for inco, lr otherwise"
        ),
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(min=1, help="trials at once", show_default="what the Ray cluster fits")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(min=0.1, max=0.9, help="share of the labelled training images that scores trials")
    ] = 0.5,
    grace_epochs: Annotated[
        int | None, typer.Option(min=1, help="ASHA: epochs before a trial may be stopped", show_default="epochs/4")
    ] = None,
    preset: Annotated[str, typer.Option(help="paper, cpu or smoke")] = "cpu",
    dataset: Annotated[str, typer.Option(help="a data set registered with `inco datasets add`")] = "default",
    seed: Annotated[int, typer.Option(help="seed of the labelled subset, the pretraining and the search")] = 0,
    optimizer: Annotated[str, typer.Option(help="pretraining optimiser: default or paper-literal")] = "default",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override for every trial, e.g. pretrain.epochs=10")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers per trial")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs each worker asks for")] = 0,
    wait: Annotated[bool, typer.Option("--wait", help="follow the search until it ends, then list the trials")] = False,
    timeout: Annotated[float | None, typer.Option(min=0, help="with --wait: give up after this many seconds")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Search T1, T2, a_f, K and the learning rate with Ray Tune (ASHA + Optuna); trials are scored on
    a validation split of the labelled training images, never on test images. Prints the job id."""
    spec = _spec(
        method=method,
        ratio=[ratio],
        eval_=["linear"],
        preset=preset,
        dataset=dataset,
        seed=[seed],
        optimizer=optimizer,
        set_=set_,
        device=device,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
    )
    settings: dict[str, Any] = {"trials": trials, "val_fraction": val_fraction}
    settings["params"] = param or (["t1", "t2", "a_f", "views", "lr"] if method == "inco" else ["lr"])
    if max_concurrent is not None:
        settings["max_concurrent"] = max_concurrent
    if grace_epochs is not None:
        settings["grace_epochs"] = grace_epochs
    with _api() as api:
        job = api.submit_job(kind="tune", spec=spec, tune=settings)
        _submitted(api, job, wait=wait, timeout=timeout, as_json=as_json)


def wait(
    job_id: JobId,
    timeout: Annotated[float | None, typer.Option(min=0, help="give up after this many seconds (exit 2)")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Follow a job until it ends: live progress on stderr, its results on stdout.

    Exit 0 when it succeeded, 1 when it failed or was canceled, 2 on --timeout."""
    with _api() as api:
        _wait_and_report(api, job_id, timeout, as_json)


def status(job_id: JobId, as_json: JsonFlag = False) -> None:
    """One job: status, stage, attempts, times, error, result count and the latest epoch of each stage."""
    with _api() as api:
        job = api.get_job(job_id)
        metrics = api.metrics(job_id)
    if as_json:
        from cli.render import latest_metrics

        _print_json({"job": job, "metrics": list(latest_metrics(metrics).values())})
        return
    Console().print(job_details(job, metrics))


def jobs(
    status: Annotated[
        str | None, typer.Option(help="queued, running, succeeded, failed or canceled", show_default=False)
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="at most this many")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Your team's jobs, newest first."""
    from cli.render import jobs_table

    with _api() as api:
        rows = api.list_jobs(status=status, limit=limit)
    if as_json:
        _print_json(rows)
    elif not rows:
        err_console.print("no jobs" + (f" with status {status}" if status else "") + ": submit one with `inco submit`")
    else:
        Console().print(jobs_table(rows))


def logs(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job ends")] = False,
) -> None:
    """A job's log lines: time, level, message."""
    console = Console(highlight=False, soft_wrap=True)
    shown = 0
    with _api() as api:
        while True:
            ended = not follow or api.get_job(job_id)["status"] in FINISHED
            lines = api.logs(job_id)
            for entry in lines[shown:]:
                console.print(log_line(entry))
            shown = max(shown, len(lines))
            if ended:
                return
            time.sleep(POLL_S)


def cancel(job_id: JobId) -> None:
    """Cancel a job: a queued one ends at once, a running one within seconds."""
    with _api() as api:
        job = api.cancel(job_id)
    line = f"job {job['id']}: [{_style(job['status'])}]{job['status']}[/]"
    if job["status"] not in FINISHED:
        line += f", cancel requested; it stops within seconds (`inco wait {job['id']}`)"
    Console(highlight=False).print(line, soft_wrap=True)


def results(
    method: Annotated[str | None, typer.Option(help="only this method")] = None,
    ratio: Annotated[str | None, typer.Option(help="only this label ratio, e.g. 1:16")] = None,
    eval_: Annotated[str | None, typer.Option("--eval", help="only finetune or linear")] = None,
    preset: Annotated[str | None, typer.Option(help="only paper, cpu or smoke")] = None,
    dataset: Annotated[str | None, typer.Option(help="only this data set")] = None,
    tune_job: Annotated[
        str | None, typer.Option("--tune", help="instead: the trials of this tune job, best first")
    ] = None,
    format_: Annotated[str, typer.Option("--format", help="table, json or csv")] = "table",
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="also write these rows as Figure 4 (accuracy against the labelled ratio) to this .png or .svg "
            "file; with --tune, the trials",
            show_default=False,
        ),
    ] = None,
) -> None:
    """The leaderboard: mean ± std of test accuracy over seeds, per method and label ratio (Table 1).

    json and csv give the raw rows, accuracy as a fraction. With --tune JOB_ID: the search's trials.
    With --plot FILE: the same rows drawn as the paper's Figure 4 (drawn by the API)."""
    if format_ not in ("table", "json", "csv"):
        fail(f"--format must be table, json or csv (got {format_!r})")
    if plot is not None:
        plot_format(plot)  # a bad suffix is said before any request
    if tune_job is not None:
        _tune_results(tune_job, format_, plot)
        return
    filters = {"method": method, "ratio": ratio, "eval": eval_, "preset": preset, "dataset": dataset}
    with _api() as api:
        rows = api.leaderboard(**filters)
        if plot is not None and not rows:
            fail(f"no results yet, nothing to draw in {plot}: submit a job with `inco submit`, or loosen the filters")
        if plot is not None:
            _write_plot(plot, api.figure4(plot_format(plot), **filters), f"Figure 4 of {len(rows)} row(s)")
    if format_ == "json":
        _print_json(rows)
    elif format_ == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
        writer.writerows([row[f] for f in CSV_FIELDS] for row in rows)
    elif not rows:
        err_console.print("no results yet: submit a job with `inco submit`, or loosen the filters")
    else:
        console = Console()
        for table in leaderboard_tables(rows):
            console.print(table)


TRIAL_FIELDS = ("number", "status", "score", "epoch", "epochs", "params", "error")


def _write_plot(path: Path, data: bytes, what: str) -> None:
    write_file(path, data)
    err_console.print(f"wrote {what} to {path}", highlight=False, soft_wrap=True)


def _tune_results(job_id: str, format_: str, plot: Path | None = None) -> None:
    with _api() as api:
        rows = api.trials(job_id)
        if plot is not None and not rows:
            fail(f"tune job {job_id} has no trials yet, nothing to draw in {plot}: `inco wait {job_id}` follows it")
        if plot is not None:
            _write_plot(plot, api.job_plot(job_id, "trials", plot.suffix.lower()[1:]), f"the {len(rows)} trial(s)")
    if format_ == "json":
        _print_json(rows)
    elif format_ == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(("rank", *TRIAL_FIELDS))
        for rank, row in enumerate(rows, start=1):
            writer.writerow((rank, *(json.dumps(row[f]) if f == "params" else row[f] for f in TRIAL_FIELDS)))
    elif not rows:
        err_console.print(f"tune job {job_id} has no trials yet: `inco wait {job_id}` follows it")
    else:
        Console().print(trials_table(rows, title=f"tune job {job_id}: trials, best first"))


datasets_app = App(help="Data sets registered with the service; `inco datasets` lists them.")


@datasets_app.callback(invoke_without_command=True)
def datasets(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List your team's data sets (`inco datasets add NAME PATH` registers one)."""
    if ctx.invoked_subcommand is not None:
        return
    with _api() as api:
        rows = api.datasets()
    if as_json:
        _print_json(rows)
    elif not rows:
        err_console.print("no data sets: register a folder with `inco datasets add NAME PATH`")
    else:
        Console().print(datasets_table(rows))


@datasets_app.command("add")
def datasets_add(
    name: Annotated[str, typer.Argument(help="the name jobs use (`inco submit --dataset NAME`)")],
    path: Annotated[str, typer.Argument(help="a folder under the server's data root (INCO_DATA_ROOT)")],
) -> None:
    """Register a folder of class sub-folders (or NEU-style file names) under a name."""
    with _api() as api:
        ds = api.add_dataset(name=name, path=path)
    Console(highlight=False).print(
        f"registered data set {ds['name']}: {ds['images']} images, {len(ds['classes'])} classes ({ds['path']})",
        soft_wrap=True,
    )


@datasets_app.command("upload")
def datasets_upload(
    name: Annotated[str, typer.Argument(help="the name jobs use (`inco submit --dataset NAME`)")],
    archive: Annotated[Path, typer.Argument(help="a .zip, .tar or .tar.gz of class folders of images")],
) -> None:
    """Upload an archive of class folders; the server unpacks it under its data root and registers it."""
    if not archive.is_file():
        fail(f"no file {archive}: pass the path of a .zip, .tar or .tar.gz of class folders")
    with _api() as api:
        ds = api.upload_dataset(name=name, archive=archive)
    Console(highlight=False).print(
        f"uploaded data set {ds['name']}: {ds['images']} images, {len(ds['classes'])} classes ({ds['path']})",
        soft_wrap=True,
    )


def register(app: App) -> None:
    for command in (submit, tune, jobs, status, wait, logs, cancel, results):
        app.command()(command)
    app.add_typer(datasets_app, name="datasets")
