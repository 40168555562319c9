"""Rich rendering for the CLI: live progress of training stages and the results table."""

from __future__ import annotations

from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from rich.console import Console, Group
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from inco_core.config import METHODS
from inco_core.progress import EpochLog

_FIELDS = (("loss", "loss {:.3f}"), ("dwv_weight", "w {:.3f}"), ("knn", "kNN {:.1%}"), ("img_per_s", "{:.0f} img/s"))


def _describe(metrics: dict[str, float]) -> str:
    return "  ".join(fmt.format(metrics[key]) for key, fmt in _FIELDS if key in metrics)


class RichReporter:
    """A progress bar per stage (pretrain, finetune 1:32, ...), with the latest epoch's numbers."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.fields[stage]:<15}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[epoch]}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def stage_start(self, stage: str, total_steps: int) -> None:
        self.tasks[stage] = self.progress.add_task(stage, total=total_steps, stage=stage, epoch="", info="")

    def step(self, stage: str, logs: dict[str, float]) -> None:
        self.progress.update(self.tasks[stage], advance=1, info=_describe(logs))

    def epoch_end(self, log: EpochLog) -> None:
        self.progress.update(
            self.tasks[log.stage], epoch=f"epoch {log.epoch}/{log.epochs}", info=_describe(log.metrics)
        )

    def stage_end(self, stage: str) -> None:
        task = self.tasks[stage]
        self.progress.update(task, completed=self.progress.tasks[task].total)


def results_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"Results ({result['spec']['preset']} preset, {result['hardware']})")
    for col in ("method", "ratio", "eval", "seed", "labelled", "accuracy", "lowest class recall", "time"):
        table.add_column(col, justify="right" if col not in ("method", "eval") else "left")
    for row in result["results"]:
        worst = min(row["per_class_recall"].items(), key=lambda kv: kv[1])
        table.add_row(
            row["variant"],
            row["ratio"],
            row["eval"],
            str(row["seed"]),
            str(row["labelled_images"]),
            f"{row['accuracy']:.2%}",
            f"{worst[0]} {worst[1]:.0%}",
            f"{row['wall_time_s']:.0f} s",
        )
    return table


# -- the service's jobs, results and data sets (``inco jobs``, ``inco wait``, ``inco results``, ...) ----
STATUS_STYLE = {
    "completed": "bold green",
    "stopped": "yellow",
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "canceled": "magenta",
}


def when(value: str | None) -> str:
    """An API time (ISO 8601, UTC when it carries no zone) in local time, to the second."""
    if not value:
        return "-"
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return value
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def styled_status(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def latest_metrics(metrics: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The most recent epoch of each stage, in the order the stages started."""
    latest: dict[str, dict[str, Any]] = {}
    for m in metrics:
        if m["stage"] not in latest or m["epoch"] >= latest[m["stage"]]["epoch"]:
            latest[m["stage"]] = m
    return latest


class JobProgress:
    """Live bars of a service job's stages, fed from ``GET /v1/jobs/{id}/metrics`` polls."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.fields[stage]:<15}"),
            BarColumn(),
            TextColumn("{task.fields[epoch]}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> JobProgress:
        return self  # the bars start with the first stage: a queued job shows no empty display

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.tasks:
            self.progress.stop()

    def note(self, message: str) -> None:
        """A line above the bars (a status change)."""
        self.progress.console.print(message, highlight=False, soft_wrap=True)

    def show(self, metrics: list[dict[str, Any]]) -> None:
        for stage, m in latest_metrics(metrics).items():
            if not self.tasks:
                self.progress.start()
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(stage, total=m["epochs"], stage=stage, epoch="", info="")
            self.progress.update(
                self.tasks[stage],
                total=m["epochs"],
                completed=m["epoch"],
                epoch=f"epoch {m['epoch']}/{m['epochs']}",
                info=_describe(m["values"]),
            )


def _spec_summary(spec: dict[str, Any]) -> tuple[str, str, str]:
    return spec.get("method", "?"), ", ".join(spec.get("ratios", [])), spec.get("preset", "?")


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(title="Jobs (newest first)")
    for col in ("id", "kind", "method", "ratios", "preset", "status", "stage", "created", "results"):
        table.add_column(col, justify="right" if col == "results" else "left", no_wrap=col == "id")
    for job in jobs:
        method, ratios, preset = _spec_summary(job["spec"])
        table.add_row(
            job["id"],
            job["kind"],
            method,
            ratios,
            preset,
            styled_status(job["status"]),
            job.get("stage") or "-",
            when(job["created_at"]),
            str(job.get("results", 0)),
        )
    return table


def job_details(job: dict[str, Any], metrics: list[dict[str, Any]]) -> Group:
    """``inco status``: the job's fields, then the latest epoch of each stage."""
    spec = job["spec"]
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    rows: list[tuple[str, str | Text]] = [
        ("job", job["id"]),
        ("kind", job["kind"] + (f" of pretrain job {job['pretrained_job']}" if job.get("pretrained_job") else "")),
        ("status", styled_status(job["status"] + (" (cancel requested)" if job.get("cancel_requested") else ""))),
        ("stage", job.get("stage") or "-"),
        ("method", spec.get("method", "?")),
        ("data set", (spec.get("data") or {}).get("dataset") or "-"),
        ("ratios", ", ".join(spec.get("ratios", []))),
        ("evals", ", ".join(spec.get("evals", []))),
        ("preset", spec.get("preset", "?")),
        ("seeds", ", ".join(str(s) for s in spec.get("seeds", []))),
        ("attempts", str(job.get("attempts", 0)) + (f" (worker {job['worker']})" if job.get("worker") else "")),
        ("created", when(job["created_at"])),
        ("started", when(job.get("started_at"))),
        ("finished", when(job.get("finished_at"))),
        ("results", str(job.get("results", 0))),
    ]
    if job.get("error"):
        rows.append(("error", Text(job["error"], style="red")))
    for name, value in rows:
        fields.add_row(name, value)
    latest = latest_metrics(metrics)
    if not latest:
        return Group(fields)
    stages = Table(title="Latest epoch per stage")
    for col in ("stage", "epoch", "metrics", "at"):
        stages.add_column(col)
    for stage, m in latest.items():
        stages.add_row(stage, f"{m['epoch']}/{m['epochs']}", _describe(m["values"]), when(m["created_at"]))
    return Group(fields, stages)


def job_results_table(rows: list[dict[str, Any]]) -> Table:
    """Per-seed rows of one job (``GET /v1/jobs/{id}/results``), like ``inco run`` prints them."""
    return results_table({"spec": {"preset": rows[0]["preset"]}, "hardware": rows[0]["hardware"], "results": rows})


def log_line(entry: dict[str, Any]) -> Text:
    style = {"error": "red", "warning": "yellow"}.get(entry["level"], "")
    return Text.assemble(
        (when(entry["created_at"]), "dim"), " ", (f"{entry['level']:<7}", style), " ", entry["message"]
    )


def ratio_n(ratio: str) -> int:
    """16 for "1:16" (unparsable ratios sort last)."""
    try:
        return int(ratio.split(":")[1])
    except (IndexError, ValueError):
        return 1 << 30


def _variant_key(row: dict[str, Any]) -> tuple[int, str]:
    method = row["method"]
    return (METHODS.index(method) if method in METHODS else len(METHODS), row["variant"])


def leaderboard_tables(rows: list[dict[str, Any]]) -> list[Group]:
    """One table per (data set, preset and its overrides, evaluation), laid out like the paper's Table 1: a row per
    method variant, a column per label ratio (1:2 before 1:16), cells mean ± std over seeds in %."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["preset"], row.get("setup", ""), row["eval"]), []).append(row)
    tables = []
    for (dataset, preset, setup, ev), cells in sorted(groups.items()):
        ratios = sorted({c["ratio"] for c in cells}, key=ratio_n)
        variants = sorted({(_variant_key(c), c["variant"]) for c in cells})
        best = {r: max(c["mean"] for c in cells if c["ratio"] == r) for r in ratios}
        with_setup = f" ({setup})" if setup else ""
        title = Text(
            f"{dataset} · {preset} preset{with_setup} · {ev}: test accuracy (%), mean ± std over seeds", style="bold"
        )
        table = Table()
        table.add_column("method")
        for ratio in ratios:
            table.add_column(ratio, justify="right")
        by_cell = {(c["variant"], c["ratio"]): c for c in cells}
        for _, variant in variants:
            out: list[str | Text] = [variant]
            for ratio in ratios:
                c = by_cell.get((variant, ratio))
                if c is None:
                    out.append("-")
                    continue
                text = f"{c['mean'] * 100:.2f} ± {c['std'] * 100:.2f} (n={c['count']})"
                out.append(Text(text, style="bold" if len(variants) > 1 and c["mean"] == best[ratio] else ""))
            table.add_row(*out)
        tables.append(Group(title, table))
    return tables


def datasets_table(datasets: list[dict[str, Any]]) -> Table:
    table = Table(title="Data sets")
    for col in ("name", "images", "classes", "path", "registered"):
        table.add_column(col, justify="right" if col == "images" else "left")
    for d in datasets:
        classes = f"{len(d['classes'])}: {', '.join(d['classes'])}"
        table.add_row(d["name"], str(d["images"]), classes, d["path"], when(d["created_at"]))
    return table


def _param_text(params: dict[str, Any]) -> str:
    short = {k.rsplit(".", 1)[-1]: v for k, v in sorted(params.items())}
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in short.items())


def trials_table(trials: list[dict[str, Any]], *, title: str = "") -> Table:
    """Trials of a tune job as the API ranks them (best first): validation accuracy, epochs, params."""
    table = Table(title=title or None, title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("trial", justify="right")
    table.add_column("status")
    table.add_column("val acc %", justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("parameters (pretrain.*)")
    for rank, t in enumerate(trials, start=1):
        score = "-" if t["score"] is None else f"{100 * t['score']:.2f}"
        note = _param_text(t["params"])
        if t.get("error"):
            note += f"  [red]{t['error'][:120]}[/]"
        table.add_row(
            str(rank),
            str(t["number"]),
            styled_status(t["status"]),
            score,
            f"{t['epoch']}/{t['epochs']}",
            note,
        )
    return table
