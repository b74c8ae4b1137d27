"""Which worker runs which trial, as one loop any clock can drive (Ray actors, or the tests'
virtual clock): docs/ARCHITECTURE.md, "A trial's life".
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from evomerge.search.trial import Feed, OnResult, Queue, Trial, TrialResult


@dataclass(frozen=True)
class Done:
    """A job ended with a result (a worker's own FAILED one included)."""

    job: Hashable
    result: TrialResult


@dataclass(frozen=True)
class Cancelled:
    """A cancelled job stopped; its worker is free."""

    job: Hashable


@dataclass(frozen=True)
class Died:
    """A job's worker is gone (killed, its node lost): it needs replacing."""

    job: Hashable
    why: str


@dataclass(frozen=True)
class Ready:
    """A (replacement) worker has started and takes trials."""

    worker: object


Event = Done | Cancelled | Died | Ready


@dataclass
class Running:
    worker: object
    trial: Trial
    started: float
    feed: Feed  # the feed that handed it out: its result goes back only there
    cancelled: bool = False


class Split:
    """A generation's whole candidates as a feed that shards its tail (`fitness.shards`: auto;
    a count: every candidate in that many; off, or metrics `can` not combine: whole).
    `pieces` says how many each candidate took."""

    def __init__(
        self, trials: list[Trial], workers: int, shards: str | int, can: Callable[[], bool]
    ):
        self.whole = collections.deque(trials)
        self.first = len(trials)
        self.can = can  # whether shards combine (asked once, and only if one is wanted)
        self.parts: collections.deque[Trial] = collections.deque()
        self.workers = workers
        self.shards = shards
        self.pieces: dict[tuple[int, int], int] = {}

    def take(self, worker: int) -> Trial | None:
        if self.parts:
            return self.parts.popleft()
        if not self.whole:
            return None
        trial = self.whole.popleft()
        k = self._pieces(len(self.whole) + 1)
        if k > 1 and not self.can():
            k, self.shards = 1, "off"
        self.pieces[trial.key] = k
        if k == 1:
            return trial
        self.parts.extend(
            Trial(trial.generation, trial.index, trial.recipe, (j, k), trial.items)
            for j in range(1, k)
        )
        return Trial(trial.generation, trial.index, trial.recipe, (0, k), trial.items)

    def _pieces(self, remaining: int) -> int:
        if self.shards == "off":
            return 1
        if isinstance(self.shards, int):
            return max(1, self.shards)
        if remaining >= self.workers:
            return 1
        if self.first < self.workers:  # all start at once: the workers shared out evenly
            j = self.first - remaining
            return self.workers // self.first + (j < self.workers % self.first)
        return -(-self.workers // remaining)  # as the busy workers free up

    def wanted(self, trial: Trial) -> bool:
        return True

    def done(self) -> bool:
        return not self.whole and not self.parts


class Scheduler:
    """Every decision of the loop; the world only through launch, cancel, wait and replace."""

    workers: int  # worker slots (the tail split fills them)
    trial_timeout: float = float("inf")
    shards: str | int = "off"  # fitness.shards

    def __init__(self, combine: Callable[[list[TrialResult]], TrialResult] | None = None):
        self.idle: list = []  # started workers not running a trial
        self.running: dict[Hashable, Running] = {}  # outlives a `stream` that stops waiting
        self.combine = combine  # one candidate's result from its shards'
        self._log: Callable[[str], None] | None = None
        self._unlogged: list[str] = []  # said before the driver gave its log

    def log_to(self, log: Callable[[str], None]) -> None:
        """Where `say` writes (the run's log), with what was said before."""
        self._log = log
        for line in self._unlogged:
            log(line)
        self._unlogged = []

    def say(self, line: str) -> None:
        (self._log or self._unlogged.append)(line)

    # -- mechanics a subclass provides ----------------------------------------------------
    def launch(self, worker, trial: Trial) -> Hashable:
        raise NotImplementedError

    def cancel(self, job: Hashable) -> None:
        raise NotImplementedError

    def wait(self) -> Sequence[Event]:
        """The events since the last call: at least one, or none after a short poll."""
        raise NotImplementedError

    def replace(self, worker, why: str) -> None:
        """Stop `worker` for good and start another, which arrives later as `Ready`."""
        raise NotImplementedError

    def now(self) -> float:
        return time.monotonic()

    def shardable(self) -> bool:
        """Whether a candidate's score can be combined from its shards' (mean metrics)."""
        return False

    def arrived(self, trial: Trial, result: TrialResult, wanted: bool) -> None:
        """Every result that comes back, `wanted` or dropped (benchmarks count busy time)."""

    def shutdown(self) -> None:
        """Stop the workers (an Executor's last call)."""

    @staticmethod
    def _gone(run: Running) -> None:
        """Tell the feed that handed out `run` its worker holds nothing any more (racing keeps
        a candidate for the worker that holds it)."""
        forget = getattr(run.feed, "forget", None)
        if forget is not None:
            forget(id(run.worker))

    # -- the loop -------------------------------------------------------------------------
    def run(self, trials: list[Trial], on_result: OnResult) -> None:
        """Score whole candidates; a generation's tail in shards (see `Split`)."""
        if self.shards == "off" or self.combine is None:
            return self.stream(Queue(trials), on_result)
        split = Split(trials, self.workers, self.shards, self.shardable)
        parts: dict[tuple[int, int], dict[int, TrialResult]] = collections.defaultdict(dict)
        by_key = {t.key: t for t in trials}
        combine = self.combine

        def on_part(part: Trial, result: TrialResult) -> None:
            if part.shard is None:
                return on_result(by_key[part.key], result)
            parts[part.key][part.shard[0]] = result
            if len(parts[part.key]) == split.pieces[part.key]:
                # in shard order: a sum in arrival order would differ in its last bits
                done = parts.pop(part.key)
                on_result(by_key[part.key], combine([done[j] for j in sorted(done)]))

        self.stream(split, on_part)

    def stream(self, feed: Feed, on_result: OnResult) -> None:
        """Until `feed` is done and none of its wanted trials runs. A trial it stops wanting is
        cancelled and not waited for (its result dropped, its worker idle once free), so the
        next generation starts meanwhile; one whose worker dies runs once more elsewhere."""
        retry: collections.deque[Trial] = collections.deque()
        attempts: collections.Counter = collections.Counter()
        while True:
            # every idle worker is asked: what one is not offered (a candidate another holds)
            # may be another's to take
            for worker in reversed(list(self.idle)):
                trial = retry.popleft() if retry else feed.take(id(worker))
                if trial is None:
                    continue
                self.idle.remove(worker)
                job = self.launch(worker, trial)
                self.running[job] = Running(worker, trial, self.now(), feed)
            for job, run in self.running.items():
                if not run.cancelled and not run.feed.wanted(run.trial):
                    self.cancel(job)  # the worker stops at its next batch
                    run.cancelled = True
            # done; or stuck: idle workers offered nothing and nothing running (the caller
            # finds its feed unfinished)
            waits = any(r.feed is feed and feed.wanted(r.trial) for r in self.running.values())
            if not retry and not waits and (feed.done() or (self.idle and not self.running)):
                return
            for event in self.wait():
                if isinstance(event, Ready):
                    self.idle.append(event.worker)
                    continue
                run = self.running.pop(event.job)
                trial = run.trial
                wanted = run.feed is feed and feed.wanted(trial)
                if isinstance(event, Cancelled):
                    self.idle.append(run.worker)  # only trials nobody wants are cancelled
                    ran = self.now() - run.started
                    self.arrived(trial, TrialResult.failed("cancelled", eval_seconds=ran), False)
                    continue
                if isinstance(event, Died):
                    self._gone(run)
                    self.replace(run.worker, event.why)
                    if not wanted:
                        continue
                    attempts[trial.key, trial.shard, trial.chunk] += 1
                    if attempts[trial.key, trial.shard, trial.chunk] == 1:
                        retry.appendleft(trial)
                        continue
                    result = TrialResult.failed("worker died twice running this trial")
                else:
                    self.idle.append(run.worker)
                    result = event.result
                self.arrived(trial, result, wanted)
                if wanted:
                    on_result(trial, result)
            now = self.now()
            for job, run in list(self.running.items()):
                if now - run.started > self.trial_timeout:
                    del self.running[job]
                    self._gone(run)
                    self.replace(run.worker, "timeout")
                    if run.feed is feed and feed.wanted(run.trial):
                        failed = TrialResult.failed(f"timeout after {self.trial_timeout:.0f} s")
                        on_result(run.trial, failed)
