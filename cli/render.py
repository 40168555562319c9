"""Rich rendering for the CLI: live progress of training stages and the results table."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
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
