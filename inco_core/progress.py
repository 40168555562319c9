"""How training loops report progress: a small protocol the CLI, the worker and tests implement.

A reporter may raise from any call (for example when a job is cancelled); the loop lets it through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class EpochLog:
    """One finished epoch of a stage (``pretrain``, ``finetune 1:32``, ``linear 1:2``, ...)."""

    stage: str
    epoch: int  # 1-based
    epochs: int
    metrics: dict[str, float] = field(default_factory=dict)


class Reporter(Protocol):
    def stage_start(self, stage: str, total_steps: int) -> None: ...

    def step(self, stage: str, logs: dict[str, float]) -> None: ...

    def epoch_end(self, log: EpochLog) -> None: ...

    def stage_end(self, stage: str) -> None: ...


class NullReporter:
    """Reports nothing."""

    def stage_start(self, stage: str, total_steps: int) -> None:
        pass

    def step(self, stage: str, logs: dict[str, float]) -> None:
        pass

    def epoch_end(self, log: EpochLog) -> None:
        pass

    def stage_end(self, stage: str) -> None:
        pass


class RecordingReporter(NullReporter):
    """Keeps every epoch log (tests, result files)."""

    def __init__(self) -> None:
        self.epochs: list[EpochLog] = []

    def epoch_end(self, log: EpochLog) -> None:
        self.epochs.append(log)
