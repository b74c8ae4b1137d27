"""What travels between driver and workers: a trial to run and its typed result."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Trial:
    generation: int
    index: int
    recipe: dict  # a Recipe as plain data: small, picklable, versionless
    shard: tuple[int, int] | None = None  # (i, k): score only the i-th of k example shards

    @property
    def key(self) -> tuple[int, int]:
        return (self.generation, self.index)


@dataclass(frozen=True)
class TrialResult:
    status: str  # COMPLETE | FAILED
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
        return cls(status="FAILED", fitness=math.nan, error=error, worker=worker, **kw)

    def as_dict(self) -> dict:
        return asdict(self)
