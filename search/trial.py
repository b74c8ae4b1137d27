"""What travels between driver and workers: a trial to run, its typed result, and the executor
that runs trials."""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Protocol


class Status(str, Enum):
    """A trial's state in the journal: ASKED before dispatch, then COMPLETE or FAILED."""

    ASKED = "ASKED"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value

    def is_finished(self) -> bool:
        return self is not Status.ASKED


FINISHED = (Status.COMPLETE, Status.FAILED)
_STATUS = {s.value: s for s in Status}  # a dict look-up: calling the Enum costs 20 us a line
_EMPTY: Mapping = MappingProxyType({})  # the shared default of metrics, counts (never changed)

# what a journal line may say of a trial, in the order the driver writes them
FIELDS = (
    "generation",
    "index",
    "status",
    "x",
    "time",
    "recipe",
    "fitness",
    "metrics",
    "merge_seconds",
    "eval_seconds",
    "examples",
    "worker",
    "error",
    "counts",
    "race",
    "rescored",
)
_KNOWN = frozenset(FIELDS)


class TrialRecord:
    """A trial as the journal says it: one line (a state change, or the annotation of a
    rescoring), or a trial's latest state (its lines' fields merged, `merged`).

    `fields` are the JSON fields the record holds, in their order, so `to_json()` gives back
    exactly the object read (or written): a field absent from a line, as in journals written
    before it existed, reads as its default and is not written back. Fields this version does
    not know are kept in `extra`. `x` may be held as its JSON text and parsed when first read:
    status and report never read it, and parsing its floats was most of reading a journal.
    `recipe` is a `Packed` in records as journaled (`search.run.journal.full` builds it).

    Records are values: nothing changes one once built (`merged`, `with_recipe` make new
    ones). Item access (`record["fitness"]`, `.get`, `in`) reads the fields present, for
    scripts written against the dicts of before."""

    __slots__ = (
        "_x",
        "counts",
        "error",
        "eval_seconds",
        "examples",
        "extra",
        "fitness",
        "generation",
        "index",
        "fields",
        "merge_seconds",
        "metrics",
        "race",
        "recipe",
        "rescored",
        "status",
        "time",
        "worker",
    )

    generation: int
    index: int
    status: Status | None  # None: an annotation line (a rescoring), no state change
    time: float | None
    recipe: Any  # a Recipe as plain data, a journal.Packed, or None (no recipe journaled)
    fitness: float | None
    metrics: Mapping[str, float]
    merge_seconds: float | None
    eval_seconds: float | None
    examples: int | None
    worker: str
    error: str | None
    counts: Mapping[str, int]
    race: dict | None  # racing: the decision, its round, the chunks' per-item scores
    rescored: dict | None  # the final rescoring: fitness, examples, worker, time, metrics|error
    fields: tuple[str, ...]
    extra: dict | None

    def __init__(self, generation: int, index: int, **fields: Any):
        self._set({"generation": generation, "index": index, **fields})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrialRecord:
        """The record of a journal line's object (`generation` and `index` checked by the
        caller). `x` may be a list or its JSON text (bytes)."""
        r = cls.__new__(cls)
        r._set(data)
        return r

    def _set(self, d: Mapping[str, Any]) -> None:
        get = d.get
        self.generation = d["generation"]
        self.index = d["index"]
        status = get("status")
        self.status = None if status is None else _STATUS.get(status, status)
        self._x = get("x")
        self.time = get("time")
        self.recipe = get("recipe")
        self.fitness = get("fitness")
        self.metrics = get("metrics", _EMPTY)  # as read: a null stays null
        self.merge_seconds = get("merge_seconds")
        self.eval_seconds = get("eval_seconds")
        self.examples = get("examples")
        self.worker = get("worker", "")
        self.error = get("error")
        self.counts = get("counts", _EMPTY)
        self.race = get("race")
        self.rescored = get("rescored")
        self.fields = tuple(d)
        unknown = d.keys() - _KNOWN
        self.extra = {k: d[k] for k in unknown} if unknown else None

    @property
    def x(self) -> list[float] | None:
        """The genome the optimizer asked (ASKED lines, and the states they start)."""
        x = self._x
        if type(x) is bytes:
            x = self._x = json.loads(x)
        return x

    @property
    def key(self) -> tuple[int, int]:
        return (self.generation, self.index)

    def is_finished(self) -> bool:
        return self.status is not None and self.status.is_finished()

    def _value(self, k: str) -> Any:
        if k == "x":
            return self.x
        if self.extra is not None and k in self.extra:
            return self.extra[k]
        return getattr(self, k)

    def to_json(self) -> dict[str, Any]:
        """The JSON object again: the fields held, in their order (a `Packed` recipe built)."""
        out = {k: self._value(k) for k in self.fields}
        if "status" in out and out["status"] is not None:
            out["status"] = str(out["status"])
        recipe = out.get("recipe")
        if recipe is not None and hasattr(recipe, "build"):
            out["recipe"] = recipe.build()
        return out

    def merged(self, later: TrialRecord) -> TrialRecord:
        """This state with a later line's fields over it (a new record)."""
        r = TrialRecord.__new__(TrialRecord)
        for s in TrialRecord.__slots__:
            setattr(r, s, getattr(self, s))
        fields = self.fields
        for k in later.fields:
            if k in _KNOWN:
                setattr(r, "_x" if k == "x" else k, getattr(later, "_x" if k == "x" else k))
            if k not in fields:
                fields += (k,)
        r.fields = fields
        if later.extra:
            r.extra = {**(self.extra or {}), **later.extra}
        return r

    def with_recipe(self, recipe: Any) -> TrialRecord:
        r = TrialRecord.__new__(TrialRecord)
        for s in TrialRecord.__slots__:
            setattr(r, s, getattr(self, s))
        r.recipe = recipe
        return r

    # -- read as the dicts of before ---------------------------------------------------------
    def __contains__(self, k: object) -> bool:
        return k in self.fields

    def __getitem__(self, k: str) -> Any:
        if k not in self.fields:
            raise KeyError(k)
        return self._value(k)

    def get(self, k: str, default: Any = None) -> Any:
        return self._value(k) if k in self.fields else default

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrialRecord):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TrialRecord({self.generation}:{self.index} {self.status} {self.fitness})"


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
