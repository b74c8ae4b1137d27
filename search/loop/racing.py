"""Racing: score a generation's candidates a chunk of items at a time, and stop each one once
its rank among the `mu` best (the ranks CMA-ES weighs) is decided: OUT when `mu` others are
better to eps, SETTLED when its order against everyone still in the ranks is, FULL at its last
chunk. Decisions come from the scores alone, per round, never from arrival order; where a chunk
is scored (pieces, affinity, lookahead) never changes one. docs/ARCHITECTURE.md, Racing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from evomerge.fitness.bounds import chunk_ends, difference_bounds, piece
from evomerge.fitness.scorer import objective
from evomerge.fitness.tasks import TaskSpec
from evomerge.merge.errors import EvomergeError
from evomerge.search.trial import ItemScores, Status, Trial, TrialRecord, TrialResult

# per-item scores of these metrics are 0 or 1 (exact bounds count the ones)
BINARY_METRICS = frozenset({"acc", "acc_norm", "exact_match", "em"})

OUT, SETTLED, FULL = "out", "settled", "full"

# a worker's answer to a chunk of tasks whose metric is not a mean of per-item scores (BLEU,
# perplexity): no prefix bounds it, so the search stops with this rather than fail every trial
NOT_RACEABLE = "fitness.racing needs metrics that are means of per-item scores; turn it off"


@dataclass(frozen=True)
class Plan:
    """A generation's race: the chunk schedule, the bounds' settings, the ranks that matter."""

    fractions: tuple[float, ...]  # cumulative share of every task's items after each chunk
    confidence: float
    tolerance: float
    mu: int  # how many of the best carry weight
    specs: list[TaskSpec]  # the objective (weights, directions)
    workers: int = 1
    shards: str | int = "auto"  # fitness.shards: pieces per chunk (auto: to fill the workers)
    batch: int = 1  # chunk boundaries in whole batches of this many items (1: anywhere)

    @property
    def chunks(self) -> int:
        return len(self.fractions)

    @property
    def delta(self) -> float:
        """Each task's bound fails with at most this probability (Bonferroni over tasks)."""
        return (1 - self.confidence) / max(1, len(self.specs))

    def coefficient(self, task: str) -> float:
        total = sum(s.weight for s in self.specs) or 1.0
        s = next(s for s in self.specs if s.name == task)
        return (1 if s.direction == "maximize" else -1) * s.weight / total


@dataclass
class Costs:
    """What a search's races measured so far, for scheduling alone (never for a decision):
    a merge's seconds, an item's evaluation seconds, and how often a round stops a candidate."""

    merge: float = 0.0  # mean seconds of the merges results reported
    merges: int = 0
    item: float = 0.0  # mean evaluation seconds per item
    items: int = 0
    stops: int = 0  # candidates stopped (out or settled) at a round before the last
    exposures: int = 0  # candidates racing at a decided round, summed over the rounds

    def add(self, result: TrialResult) -> None:
        if result.merge_seconds > MERGED:
            self.merges += 1
            self.merge += (result.merge_seconds - self.merge) / self.merges
        if result.examples:
            self.items += result.examples
            self.item += (result.eval_seconds - self.item * result.examples) / self.items

    def hazard(self, chunks: int) -> float:
        """The chance a round stops a racing candidate (a prior of one per race, until
        rounds are decided)."""
        return (self.stops + 1) / (self.exposures + max(2, chunks))


# a result whose worker merged its candidate (a worker with the recipe in place reports ~1 us)
MERGED = 1e-4


@dataclass
class Entry:
    """One candidate in the race."""

    index: int
    trial: Trial | None  # None: finished in an earlier session (from the journal)
    chunks: dict[int, ItemScores] = field(default_factory=dict)
    pieces: dict[int, int] = field(default_factory=dict)  # chunk -> pieces it is split into
    handed: dict[int, set[int]] = field(default_factory=dict)  # chunk -> pieces handed out
    parts: dict[int, dict[int, ItemScores]] = field(default_factory=dict)  # pieces arrived
    state: str = "racing"  # racing | out | settled | full | failed
    stop: int | None = None  # its estimate uses chunks 0..stop
    pairs: list[list] = field(default_factory=list)  # the comparisons that decided it
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    workers: set[str] = field(default_factory=set)
    metric: dict[str, str] = field(default_factory=dict)  # task -> its metric's name
    told: float | None = None
    known: TrialRecord | None = None  # its journal record, when an earlier session finished it
    _arrays: dict = field(default_factory=dict, repr=False)  # (task, upto) -> prefix, binary

    def prefix(self, task: str, upto: int) -> list[float]:
        return [v for c in range(upto + 1) for v in self.chunks[c].scores.get(task, [])]

    def array(self, task: str, upto: int) -> tuple[np.ndarray, bool]:
        """The prefix as an array and whether it is all 0/1, computed once per round: a round
        compares every pair, and on small CPU chunks the driver's time idles the workers."""
        key = (task, upto)
        if key not in self._arrays:
            values = np.asarray(self.prefix(task, upto), dtype=float)
            self._arrays[key] = (values, bool(np.isin(values, (0.0, 1.0)).all()))
        return self._arrays[key]

    @property
    def racing(self) -> bool:
        return self.state == "racing"


class Race:
    """One generation's race. `take` hands out chunks, `add` takes their results and returns
    the journal fields of every candidate whose outcome became final; `close` returns the
    rest (the out candidates, whose told value needs everyone's) once nothing races."""

    def __init__(
        self,
        plan: Plan,
        trials: list[Trial],
        known: dict[int, TrialRecord],
        costs: Costs | None = None,
    ):
        self.plan = plan
        self.costs = costs or Costs()
        self.entries: dict[int, Entry] = {}
        for index, record in known.items():
            self.entries[index] = _known(plan, index, record)
        for t in trials:
            self.entries[t.index] = Entry(t.index, t)
        self.totals: dict[str, int] = {}
        for e in self.entries.values():
            for items in e.chunks.values():
                self.totals |= items.totals
        self.decided = 0  # rounds decided (0..chunks-1)
        self.last: dict[int, int] = {}  # worker -> the candidate it scored last
        self.final = self._advance()  # replaying known candidates may finish others at once

    # -- scheduling -----------------------------------------------------------------------
    def racing(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.racing]

    def split(self) -> int:
        """Pieces per chunk opened now (`fitness.shards`): auto, enough that the racing
        candidates' chunks of one round occupy every worker, so freed workers share the round
        that decides instead of scoring rounds that may never be needed; off, none; a count,
        that many. Never a piece without an item of the largest task. Auto splits nothing
        while merges are dear (`_merge_dear`)."""
        shards = self.plan.shards
        if shards == "off" or (shards == "auto" and self._merge_dear()):
            return 1
        k = shards if isinstance(shards, int) else self.plan.workers // max(1, len(self.racing()))
        return max(1, min(k, self._largest_chunk()) if self.totals else k)

    def lookahead(self) -> int:
        """Rounds handed out beyond the last decided: more when a round's pieces cannot
        occupy every worker."""
        n = len(self.racing())
        return max(1, math.ceil(self.plan.workers / max(1, n * self.split())))

    def take(self, worker: int) -> Trial | None:
        """The next piece for `worker`: the lowest round first, the candidate it holds (scored
        last: its weights are in place) first among equals, then one no other worker holds,
        then by index. The candidate it holds comes first even from a later round, beyond the
        lookahead, when re-merging it later is dearer than the chance of scoring it in vain
        (`_stays`)."""
        limit = min(self.plan.chunks - 1, self.decided + self.lookahead())
        held = self.last.get(worker)
        others = {i for w, i in self.last.items() if w != worker}
        best: tuple | None = None
        stay: tuple | None = None
        for e in self.racing():
            unit = self._next_piece(e)
            if unit is None or e.trial is None:
                continue
            if e.index == held:
                stay = (e, unit)
            if unit[0] > limit:
                continue
            key = (unit[0], e.index != held, e.index in others, e.index)
            if e.index != held and e.index in others and self._merge_dear():
                continue  # its holder (busy, or asked too) scores it sooner than a merge here
            if best is None or key < best[0]:
                best = (key, e, unit)
        if stay is not None and (best is None or best[1] is not stay[0]) and self._stays(*stay):
            e, unit = stay
        elif best is None:
            return None
        else:
            _, e, unit = best
        c, j = unit
        if c not in e.pieces:
            e.pieces[c], e.handed[c] = self.split(), set()
        e.handed[c].add(j)
        self.last[worker] = e.index
        assert e.trial is not None
        k = e.pieces[c]
        return Trial(
            e.trial.generation,
            e.index,
            e.trial.recipe,
            shard=(j, k) if k > 1 else None,
            chunk=c,
            items=e.trial.items,
        )

    def _stays(self, e: Entry, unit: tuple[int, int]) -> bool:
        """Whether a worker holding `e` should score its piece `unit` next rather than merge
        another candidate: if it leaves, `e` costs a merge later unless the rounds before
        stop it; if it stays, the piece is wasted if they do. Stay when the merge it saves
        is worth more than the evaluation it risks."""
        costs = self.costs
        if not costs.merges or not self.totals:
            return False  # nothing measured yet: the lowest round first
        p = 1 - (1 - costs.hazard(self.plan.chunks)) ** max(0, unit[0] - self.decided)
        return p * costs.item * self._piece_items(e, unit) < (1 - p) * costs.merge

    def _merge_dear(self) -> bool:
        """Whether a merge is measured to cost more than half a chunk's evaluation: then a
        worker that would merge a candidate to score a piece of it ends after the worker
        holding it could have scored the piece itself (pieces and helpers cost a merge)."""
        costs = self.costs
        if not (costs.merges and costs.items and self.totals):
            return False
        return costs.merge > costs.item * 0.5 * sum(self.totals.values()) / self.plan.chunks

    def _piece_items(self, e: Entry, unit: tuple[int, int]) -> int:
        c, j = unit
        return self._piece_size(c, j, e.pieces.get(c) or self.split()) if self.totals else 0

    def forget(self, worker: int) -> None:
        """`worker` is gone (died, timed out): it holds nothing any more."""
        self.last.pop(worker, None)

    def _next_piece(self, e: Entry) -> tuple[int, int] | None:
        """(chunk, piece) of `e` not handed out yet, the lowest first."""
        for c in range(self.plan.chunks):
            if c not in e.pieces:
                return c, 0
            left = set(range(e.pieces[c])) - e.handed[c]
            if left:
                return c, min(left)
        return None

    def done(self) -> bool:
        return not self.racing()

    def wanted(self, trial: Trial) -> bool:
        """A chunk matters while its candidate races."""
        return self.entries[trial.index].racing

    # -- results --------------------------------------------------------------------------
    def add(self, trial: Trial, result: TrialResult) -> list[tuple[int, dict]]:
        """A chunk's result; returns (index, journal fields) of candidates now final."""
        e = self.entries[trial.index]
        if not e.racing:
            return []  # a chunk scored ahead for a candidate stopped meanwhile: wasted
        e.merge_seconds += result.merge_seconds
        e.eval_seconds += result.eval_seconds
        self.costs.add(result)
        if result.worker:
            e.workers.add(result.worker)
        if result.error == NOT_RACEABLE:
            raise EvomergeError(NOT_RACEABLE)
        if result.status != Status.COMPLETE or result.items is None:
            e.state = "failed"
            fields = result.as_dict() | {"worker": ",".join(sorted(e.workers))}
            return [(e.index, fields | _seconds(e))] + self._advance()
        assert trial.chunk is not None
        self.totals |= result.items.totals
        j, k = trial.shard or (0, 1)
        parts = e.parts.setdefault(trial.chunk, {})
        parts[j] = result.items
        if len(parts) < k:
            return []  # the chunk's other pieces are still out
        e.chunks[trial.chunk] = _joined([parts[j] for j in range(k)])
        del e.parts[trial.chunk]
        for key in result.metrics:
            task, metric = key.split("/", 1)
            e.metric[task] = metric
        return self._advance()

    def _advance(self) -> list[tuple[int, dict]]:
        final: list[tuple[int, dict]] = []
        last = self.plan.chunks - 1
        while self.decided < last and self.racing():
            if not all(self.decided in e.chunks for e in self.racing()):
                break
            before = len(self.racing())
            final += self._decide(self.decided)
            self.costs.exposures += before
            self.costs.stops += before - len(self.racing())
            self.decided += 1
        if self.decided >= last:
            for e in self.racing():
                if last in e.chunks:
                    final += self._mark(e, FULL, last)
        return final

    def _mark(self, e: Entry, state: str, r: int) -> list[tuple[int, dict]]:
        """Decide a candidate; its journal fields when they are final now (not for out ones:
        their told value waits for `close`, nor for candidates an earlier session journaled)."""
        e.state, e.stop = state, r
        if e.known is not None:
            race = e.known.race or {}
            if (race["decision"], int(race["round"])) != (state, r):
                raise EvomergeError(
                    f"trial {e.known.generation}:{e.index}: the race replays as "
                    f"{state} at round {r}, the journal says {race['decision']} at round "
                    f"{race['round']}; the journal was edited or written by another config"
                )
            e.told = float(e.known.fitness)  # type: ignore[arg-type]
            return []
        if state == OUT:
            return []
        e.told = self.estimate(e, r)
        return [(e.index, self._fields(e))]

    def _check_replayed(self, r: int) -> None:
        for e in self.racing():
            if e.known is not None and int((e.known.race or {})["round"]) <= r:
                self._mark(e, "racing", r)  # raises: the journal decided it by now

    def close(self) -> list[tuple[int, dict]]:
        """Once nothing races: the out candidates, told their estimates clamped strictly below
        the `mu`-th best of the rest (so they stay outside the ranks that carry weight)."""
        assert self.done()
        kept = sorted(
            (
                e.told
                for e in self.entries.values()
                if e.state in (SETTLED, FULL) and e.told is not None
            ),
            reverse=True,
        )
        threshold = kept[min(self.plan.mu, len(kept)) - 1] if kept else math.inf
        out = []
        for e in sorted(self.entries.values(), key=lambda e: e.index):
            if e.state == OUT and e.trial is not None:
                assert e.stop is not None
                estimate = self.estimate(e, e.stop)
                e.told = min(estimate, float(np.nextafter(threshold, -math.inf)))
                out.append((e.index, self._fields(e, threshold)))
        return out

    # -- decisions ------------------------------------------------------------------------
    def _decide(self, r: int) -> list[tuple[int, dict]]:
        plan = self.plan
        evidence = [e for e in self.entries.values() if e.state != "failed"]
        racing = self.racing()
        bounds: dict[tuple[int, int], tuple[float, float, float]] = {}
        for i in racing:
            for j in evidence:
                if j is not i:
                    upto = r if j.racing else min(r, j.stop if j.stop is not None else r)
                    bounds[i.index, j.index] = self.pair(i, j, upto)
        # out: at least mu others are better (to eps); never fewer than mu left in the ranks
        beaten = {
            i.index: sorted(
                (bounds[i.index, j.index][1] - bounds[i.index, j.index][2], j.index)
                for j in evidence
                if j is not i and bounds[i.index, j.index][1] < bounds[i.index, j.index][2]
            )
            for i in racing
        }
        kept = sum(e.state != OUT for e in evidence)
        final = []
        for i in sorted(racing, key=lambda e: (-len(beaten[e.index]), e.index)):
            if len(beaten[i.index]) >= plan.mu and kept > plan.mu:
                i.pairs = [
                    [j, *(round(v, 6) for v in bounds[i.index, j])]
                    for _, j in beaten[i.index][: plan.mu]
                ]
                final += self._mark(i, OUT, r)
                kept -= 1
        # settled: its order against everyone still in the ranks is decided (to eps)
        standing = [e for e in evidence if e.state != OUT]
        for i in [e for e in racing if e.racing]:
            pairs = [(j.index, *bounds[i.index, j.index]) for j in standing if j is not i]
            if all(u < eps or lo > -eps for _, lo, u, eps in pairs):
                i.pairs = [[j, *(round(v, 6) for v in b)] for j, *b in pairs]
                final += self._mark(i, SETTLED, r)
        self._check_replayed(r)
        return final

    def pair(self, i: Entry, j: Entry, upto: int) -> tuple[float, float, float]:
        """(lower, upper) bounds on F_i - F_j and the tolerance eps, from chunks 0..upto."""
        lower = upper = var = 0.0
        for task, total in self.totals.items():
            (x, xbin), (y, ybin) = i.array(task, upto), j.array(task, upto)
            if not len(x):
                lo, hi = -1.0, 1.0  # nothing scored of this task yet: anything is possible
            else:
                binary = self._binary(task, i, j) and xbin and ybin
                lo, hi = difference_bounds(x, y, total, self.plan.delta, binary)
                # the variance of one item's difference, with one pseudo-win and one
                # pseudo-loss (identical prefixes do not promise identical candidates)
                d = x - y
                s2 = (float((d**2).sum()) + 2) / (len(d) + 2) - (float(d.sum()) / (len(d) + 2)) ** 2
                var += self.plan.coefficient(task) ** 2 * s2 / total
            c = self.plan.coefficient(task)
            lower += c * (lo if c >= 0 else hi)
            upper += c * (hi if c >= 0 else lo)
        return lower, upper, self.plan.tolerance * math.sqrt(var)

    def _binary(self, task: str, i: Entry, j: Entry) -> bool:
        metric = (i.metric.get(task) or j.metric.get(task) or "").split(",")[0]
        return metric in BINARY_METRICS

    def estimate(self, e: Entry, upto: int) -> float:
        """The objective on chunks 0..upto, computed as full evaluation computes it (per task,
        the mean over the items in document order): on every chunk it is full evaluation's."""
        if e.known is not None:
            return float((e.known.race or {})["estimate"])
        return objective(self._specs(e), self._metrics(e, upto))

    def _metrics(self, e: Entry, upto: int) -> dict[str, float]:
        out = {}
        for task in self.totals:
            pairs = sorted(
                (doc, v)
                for c in range(upto + 1)
                for doc, v in zip(
                    e.chunks[c].docs.get(task, []), e.chunks[c].scores.get(task, []), strict=True
                )
            )
            values = [v for _, v in pairs]
            out[f"{task}/{e.metric.get(task, '')}"] = sum(values) / len(values) if values else 0.0
        return out

    def _specs(self, e: Entry) -> list[TaskSpec]:
        return [
            s.model_copy(update={"metric": e.metric.get(s.name, s.metric)}) for s in self.plan.specs
        ]

    def _chunk_sizes(self, c: int) -> list[int]:
        """Each task's items in chunk c."""
        ends = [chunk_ends(n, self.plan.fractions, self.plan.batch) for n in self.totals.values()]
        return [e[c] - (e[c - 1] if c else 0) for e in ends]

    def _piece_size(self, c: int, j: int, k: int) -> int:
        """Items in piece j of k of chunk c, over every task."""
        return sum(b - a for a, b in (piece(n, j, k) for n in self._chunk_sizes(c)))

    def _largest_chunk(self) -> int:
        """The fewest items the largest task has in any chunk (pieces split every chunk)."""
        return min(max(self._chunk_sizes(c)) for c in range(self.plan.chunks))

    def _fields(self, e: Entry, threshold: float | None = None) -> dict:
        assert e.stop is not None and e.told is not None
        counts = {
            t: chunk_ends(n, self.plan.fractions, self.plan.batch)[e.stop]
            for t, n in self.totals.items()
        }
        used = sum(counts.values())
        # every piece handed to a worker, as if scored whole: one cancelled mid-way, or
        # dropped when its candidate stopped, cost at most that
        sizes = [self._piece_size(c, j, e.pieces[c]) for c in e.handed for j in e.handed[c]]
        race: dict = {
            "decision": e.state,
            "round": e.stop,
            "items": used,
            "of": sum(self.totals.values()),
            "scored": sum(sizes),
            "estimate": self.estimate(e, e.stop),
            "totals": dict(self.totals),
            "pairs": e.pairs,
            "scores": {t: _compact(e.prefix(t, e.stop)) for t in self.totals},
        }
        if threshold is not None:
            race["threshold"] = threshold
        return {
            "status": Status.COMPLETE.value,
            "fitness": e.told,
            "metrics": self._metrics(e, e.stop),
            "examples": used,
            "counts": counts,
            "worker": ",".join(sorted(e.workers)),
            "error": None,
            "race": race,
        } | _seconds(e)


def _seconds(e: Entry) -> dict:
    return {"merge_seconds": e.merge_seconds, "eval_seconds": e.eval_seconds}


def _joined(parts: list[ItemScores]) -> ItemScores:
    """A chunk's scores from its pieces, in piece order (each piece a contiguous slice)."""
    tasks = dict.fromkeys(t for p in parts for t in p.scores)
    return ItemScores(
        {t: [v for p in parts for v in p.scores.get(t, [])] for t in tasks},
        {t: [d for p in parts for d in p.docs.get(t, [])] for t in tasks},
        parts[0].totals,
    )


def _compact(values: list[float]) -> list:
    return [int(v) if v in (0.0, 1.0) else v for v in values]


def _known(plan: Plan, index: int, record: TrialRecord) -> Entry:
    """A candidate finished in an earlier session: it races again on its journaled scores (the
    chunks up to its decision), so every decision of the round replays as it was made."""
    race = record.race or {}
    totals = {t: int(n) for t, n in race["totals"].items()}
    e = Entry(index, None, known=record)
    for c in range(int(race["round"]) + 1):
        scores: dict[str, list[float]] = {}
        for task, values in race["scores"].items():
            ends = chunk_ends(totals[task], plan.fractions, plan.batch)
            scores[task] = [float(v) for v in values[(ends[c - 1] if c else 0) : ends[c]]]
        e.chunks[c] = ItemScores(scores, {t: [] for t in scores}, totals)
    for key in record.metrics:
        task, metric = key.split("/", 1)
        e.metric[task] = metric
    return e


def stream(executor, race: Race, on_result: Callable[[Trial, TrialResult], None]) -> None:
    """Run a race on an executor: its own `stream` when it has one, else batch by batch."""
    if hasattr(executor, "stream"):
        executor.stream(race, on_result)
        return
    while batch := [t for t in iter(lambda: race.take(0), None)]:
        executor.run(batch, on_result)


def run_race(
    executor,
    plan: Plan,
    pending: list[Trial],
    known: dict[int, TrialRecord],
    finish: Callable[[tuple[int, int], dict], None],
    costs: Costs | None = None,
) -> None:
    """Race a generation's pending candidates (beside those an earlier session finished) and
    hand each outcome to `finish` (the driver journals it) as soon as it is final."""
    plan = replace(plan, workers=int(getattr(executor, "workers", 1) or 1))
    race = Race(plan, pending, known, costs)
    g = pending[0].generation
    for index, fields in race.final:
        finish((g, index), fields)

    def on_chunk(trial: Trial, result: TrialResult) -> None:
        for index, fields in race.add(trial, result):
            finish((g, index), fields)

    stream(executor, race, on_chunk)
    if not race.done():
        raise RuntimeError(f"generation {g}: the race ended with candidates still racing")
    for index, fields in race.close():
        finish((g, index), fields)
