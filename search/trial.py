"""What travels between driver and workers: a trial to run, its typed result, and the executor
that runs trials."""

from __future__ import annotations

import collections
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
    # (i, k): score only the i-th of k example shards (racing: of the chunk's items)
    shard: tuple[int, int] | None = None
    items: str = "search"  # the item set: "search" (fitness.limit) or "rescore"
    chunk: int | None = None  # racing: score only chunk c of the generation's seeded item order

    @property
    def key(self) -> tuple[int, int]:
        return (self.generation, self.index)


@dataclass(frozen=True)
class ItemScores:
    """A racing chunk's per-item scores: task -> each item's score on the task's metric, the
    items' document ids (in the race order), and the size of the task's whole item set."""

    scores: dict[str, list[float]]
    docs: dict[str, list[int]]
    totals: dict[str, int]


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
    items: ItemScores | None = None  # racing chunks only

    @classmethod
    def failed(cls, error: str, worker: str = "", **kw) -> TrialResult:
        return cls(status=Status.FAILED, fitness=math.nan, error=error, worker=worker, **kw)

    def as_dict(self) -> dict:
        out = {**asdict(self), "status": self.status.value}
        if out["items"] is None:
            del out["items"]
        return out


OnResult = Callable[[Trial, TrialResult], None]


class Feed(Protocol):
    """What an executor's `stream` runs: trials handed out as workers free up (racing: the next
    chunks depend on the results so far)."""

    def take(self, worker: int) -> Trial | None:
        """`worker`'s next trial (the key tells workers apart); None: nothing now."""
        ...

    def wanted(self, trial: Trial) -> bool:
        """False once a trial's result can no longer matter (its candidate's race is decided):
        the executor may cancel it, and need not wait for it."""
        ...

    def done(self) -> bool:
        """Nothing more will be handed out (the stream ends once no wanted trial is running)."""
        ...


class Queue:
    """A fixed list of trials as a feed: every one wanted, done once all are handed out."""

    def __init__(self, trials: list[Trial]):
        self.trials = collections.deque(trials)

    def take(self, worker: int) -> Trial | None:
        return self.trials.popleft() if self.trials else None

    def wanted(self, trial: Trial) -> bool:
        return True

    def done(self) -> bool:
        return not self.trials


class Executor(Protocol):
    """Runs trials somewhere (in-process, Ray actors) and reports each result as it arrives."""

    workers: int

    def run(self, trials: list[Trial], on_result: OnResult) -> None: ...

    # optional (racing): `stream(feed, on_result)` runs what a Feed hands out as workers free

    def shutdown(self) -> None: ...
