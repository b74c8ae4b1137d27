"""What travels between driver and workers: a trial to run, its typed result, and the executor
that runs trials."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Protocol


class Status(str, Enum):
    """A trial's state in the journal: ASKED before dispatch, then COMPLETE or FAILED."""

    ASKED = "ASKED"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value


FINISHED = (Status.COMPLETE, Status.FAILED)


@dataclass(frozen=True)
class Trial:
    generation: int
    index: int
    recipe: dict  # a Recipe as plain data: small, picklable, versionless
    shard: tuple[int, int] | None = None  # (i, k): score only the i-th of k example shards
    items: str = "search"  # the item set: "search" (fitness.limit) or "rescore"

    @property
    def key(self) -> tuple[int, int]:
        return (self.generation, self.index)


@dataclass(frozen=True)
class TrialResult:
    status: Status  # COMPLETE or FAILED
    fitness: float  # the objective when COMPLETE, NaN when FAILED (the driver applies the penalty)
    metrics: dict[str, float] = field(default_factory=dict)
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    examples: int = 0
    worker: str = ""
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # task -> examples scored

    @classmethod
    def failed(cls, error: str, worker: str = "", **kw) -> TrialResult:
        return cls(status=Status.FAILED, fitness=math.nan, error=error, worker=worker, **kw)

    def as_dict(self) -> dict:
        return {**asdict(self), "status": self.status.value}


OnResult = Callable[[Trial, TrialResult], None]


class Executor(Protocol):
    """Runs trials somewhere (in-process, Ray actors) and reports each result as it arrives."""

    workers: int

    def run(self, trials: list[Trial], on_result: OnResult) -> None: ...

    def shutdown(self) -> None: ...
