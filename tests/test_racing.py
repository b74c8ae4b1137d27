"""Racing (search/racing.py) through the real driver and CMA-ES, with a model-free executor.

`Scripted` scores a candidate from its recipe alone (each task's skill a seeded function of the
recipe, each item a seeded draw with that chance), so a search takes seconds, candidates differ
widely, and full evaluation's score of every candidate is known exactly: a decision racing made
can be checked against the truth, not only against racing's own bookkeeping."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from evomerge.fitness.bounds import chunk_ends, chunk_fractions, difference_bounds, piece
from evomerge.fitness.scorer import objective
from evomerge.merge.errors import EvomergeError
from evomerge.search.config import RacingConfig, SearchConfig
from evomerge.search.driver import Progress, run_search
from evomerge.search.racing import NOT_RACEABLE
from evomerge.search.report import summarize, trials_frame
from evomerge.search.rundir import RunDir
from evomerge.search.trial import ItemScores, Queue, Status, Trial, TrialResult
from tests.conftest import search_config

ITEMS = 60
# one 0/1 metric (exact, hypergeometric bounds) and one graded metric (Bernstein-Serfling)
METRIC = {"zoo_add_gen_search": "exact_match", "zoo_caps_mc_search": "score"}


def _uniform(*key) -> float:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def item_score(recipe: dict, task: str, doc: int) -> float:
    skill = 0.05 + 0.9 * _uniform(recipe, task)
    if METRIC[task] == "exact_match":
        return float(_uniform(recipe, task, doc) < skill)
    return (
        round(4 * skill * _uniform(recipe, task, doc)) / 4
        if skill < 0.5
        else 1.0 - round(4 * (1 - skill) * _uniform(recipe, task, doc)) / 4
    )


def full_fitness(config, recipe: dict) -> float:
    """What full evaluation scores the candidate: every item, in document order."""
    specs = [s.model_copy(update={"metric": METRIC[s.name]}) for s in config.fitness.tasks]
    metrics = {}
    for task in METRIC:
        values = [item_score(recipe, task, d) for d in range(ITEMS)]
        metrics[f"{task}/{METRIC[task]}"] = sum(values) / len(values)
    return objective(specs, metrics)


class Scripted:
    """An executor whose workers score from the recipe alone. `workers` of them run at once;
    results arrive in a seeded random order (never the order handed out)."""

    def __init__(self, config, workers: int = 1, arrival_seed: int = 0):
        self.config = config
        self.workers = workers
        self.rng = random.Random(arrival_seed)
        self.specs = [s.model_copy(update={"metric": METRIC[s.name]}) for s in config.fitness.tasks]
        self.concurrent_chunks = 0  # most chunks of one candidate in flight at once
        self.seen: list[Trial] = []

    def score(self, trial: Trial) -> TrialResult:
        self.seen.append(trial)
        rc = self.config.fitness.racing
        if trial.chunk is None:
            docs = {t: list(range(ITEMS)) for t in METRIC}
        else:
            docs = {}
            for task in METRIC:
                order = list(range(ITEMS))
                random.Random(f"{self.config.cma.seed}/{trial.generation}/{task}").shuffle(order)
                ends = chunk_ends(ITEMS, chunk_fractions(rc.first_chunk, rc.chunks))
                c = trial.chunk
                chunk = order[(ends[c - 1] if c else 0) : ends[c]]
                a, b = piece(len(chunk), *trial.shard) if trial.shard else (0, len(chunk))
                docs[task] = chunk[a:b]
        scores = {t: [item_score(trial.recipe, t, d) for d in ds] for t, ds in docs.items()}
        metrics = {
            f"{t}/{METRIC[t]}": sum(v for _, v in sorted(zip(docs[t], s, strict=True))) / len(s)
            for t, s in scores.items()
        }
        counts = {t: len(s) for t, s in scores.items()}
        items = (
            ItemScores(scores, docs, {t: ITEMS for t in METRIC})
            if trial.chunk is not None
            else None
        )
        return TrialResult(
            Status.COMPLETE,
            objective(self.specs, metrics),
            metrics,
            merge_seconds=0.0,
            eval_seconds=float(sum(counts.values())),
            examples=sum(counts.values()),
            worker=f"w{self.workers}",
            counts=counts,
            items=items,
        )

    def run(self, trials, on_result) -> None:
        for trial in trials:
            on_result(trial, self.score(trial))

    def stream(self, feed, on_result) -> None:
        inflight: list[tuple[int, Trial]] = []
        idle = list(range(self.workers))
        while True:
            while idle and (trial := feed.take(idle[-1])) is not None:
                inflight.append((idle.pop(), trial))
            if not inflight:
                return
            keys = [t.key for _, t in inflight]
            self.concurrent_chunks = max(self.concurrent_chunks, *map(keys.count, keys))
            worker, trial = inflight.pop(self.rng.randrange(len(inflight)))
            idle.append(worker)
            on_result(trial, self.score(trial))

    def shutdown(self) -> None:
        pass


class Clocked(Scripted):
    """Scripted workers on a virtual clock, run as RayExecutor runs them: a trial takes one
    time unit per item, plus `merge` units when its worker holds another recipe; a trial its
    feed stops wanting is cancelled and ends at its next batch of `batch` items, and a stream
    returns once its feed is done and no trial it wants runs. `busy` and `used` (busy on
    results that were used) and `span` count the search's generations only."""

    def __init__(self, config, workers: int, merge: float = 5.0, batch: int = 8):
        super().__init__(config, workers)
        self.merge, self.batch = merge, batch
        self.now = self.busy = self.used = self.span = 0.0
        self.held: dict[int, dict] = {}  # worker -> the recipe in its model
        self.running: list[list] = []  # [end, worker, trial, feed, started, cancelled, result]
        self.idle = list(range(workers))

    def run(self, trials, on_result) -> None:
        timed = bool(trials) and trials[0].generation > 0 and trials[0].items == "search"
        self.stream(Queue(trials), on_result, timed)

    def stream(self, feed, on_result, timed: bool = True) -> None:
        start, busy, used = self.now, self.busy, self.used
        while True:
            while self.idle and (trial := feed.take(self.idle[-1])) is not None:
                worker = self.idle.pop()
                result = self.score(trial)
                merge = self.merge if self.held.get(worker) != trial.recipe else 0.0
                self.held[worker] = trial.recipe
                end = self.now + merge + result.examples
                self.running.append([end, worker, trial, feed, self.now, False, result])
            for r in self.running:
                if not r[5] and not r[3].wanted(r[2]):
                    ran = self.now - r[4]
                    r[0], r[5] = min(r[0], r[4] + (ran // self.batch + 1) * self.batch), True
            wanted = any(r[3] is feed and feed.wanted(r[2]) for r in self.running)
            if not wanted and (feed.done() or (self.idle and not self.running)):
                if timed:
                    self.span += self.now - start
                else:
                    self.busy, self.used = busy, used
                return
            self.running.sort(key=lambda r: r[0])
            end, worker, trial, owner, started, _, result = self.running.pop(0)
            self.now = end
            self.busy += end - started
            self.idle.append(worker)
            if owner is feed and feed.wanted(trial):
                self.used += end - started
                on_result(trial, result)


class Stop(Exception):
    pass


def _config(zoo, racing: dict | None, popsize: int = 8, budget: int = 48, active=None):
    fitness = {
        "tasks": [{"name": t, "metric": m} for t, m in METRIC.items()],
        "include": [str(zoo / "tasks")],
        "limit": ITEMS,
    }
    if racing is not None:
        fitness["racing"] = {"enabled": True, "chunks": 5, "first_chunk": 0.2, **racing}
    cma = {"popsize": popsize, "budget": budget, "seed": 3, "sigma0": 0.3}
    if active is not None:
        cma["active"] = active
    return search_config(zoo, fitness=fitness, cma=cma, space={"method": "task_arithmetic"})


def _search(path, cfg, workers=1, arrival_seed=0, stop_after=None):
    run = RunDir.reopen(path, cfg) if (path / "run.yaml").exists() else RunDir.create(path, cfg)
    seen = [0]

    def on_result(done, record, best):
        seen[0] += 1
        if stop_after is not None and seen[0] >= stop_after:
            raise Stop

    best = run_search(
        run, lambda: Scripted(cfg, workers, arrival_seed), Progress(on_result=on_result)
    )
    return best, RunDir.reopen(path).trials()


def _weighted(trials, popsize, mu):
    """Per generation, the indices of its mu best by the fitness CMA-ES was told, in order."""
    out = []
    for g in sorted({g for g, _ in trials}):
        told = [trials[(g, i)]["fitness"] for i in range(popsize)]
        out.append(sorted(range(popsize), key=lambda i: -told[i])[:mu])
    return out


CERTAIN = {"confidence": 1, "tolerance": 0}


@pytest.mark.parametrize("workers", [1, 5, 16])
def test_certainty_makes_the_decisions_of_full_evaluation(tiny_zoo, tmp_path, workers):
    """At confidence 1 and tolerance 0 racing stops candidates (on the hard bound alone) yet
    CMA-ES sees the same best half, in the same order, and asks the same generations as with
    every item scored; on any number of workers, results arriving in any order."""
    full = _config(tiny_zoo, None, active=False)
    _, ref = _search(tmp_path / "full", full)
    cfg = _config(tiny_zoo, CERTAIN)
    _, raced = _search(tmp_path / "race", cfg, workers, arrival_seed=workers)
    assert sorted(ref) == sorted(raced)
    for key in ref:  # the same candidates asked, generation after generation
        assert raced[key]["x"] == ref[key]["x"]
    assert _weighted(raced, 8, 4) == _weighted(ref, 8, 4)
    stopped = [t for t in raced.values() if t["race"]["decision"] != "full"]
    assert len(stopped) >= 4  # it did stop candidates: the test compares something
    if workers == 1:  # many workers score ahead the late chunks certainty stops before
        assert sum(t["race"]["scored"] for t in raced.values()) < len(raced) * 2 * ITEMS
    for t in raced.values():  # and what each was told is consistent with the truth
        truth = full_fitness(cfg, t["recipe"])
        if t["race"]["decision"] == "full":
            assert t["fitness"] == truth == ref[t["generation"], t["index"]]["fitness"]


def test_a_stopped_candidate_is_below_what_it_was_stopped_against(tiny_zoo, tmp_path):
    """At the default confidence: every out candidate's journaled bounds put it below `mu`
    others (to the tolerance), recomputing those bounds from its journaled item scores gives
    the same numbers, and it was told less than the mu-th best of the rest. At certainty the
    same holds against full evaluation's true scores."""
    for racing in ({}, CERTAIN):
        path = tmp_path / ("certain" if racing else "default")
        cfg = _config(tiny_zoo, racing)
        _, trials = _search(path, cfg)
        outs = [t for t in trials.values() if t["race"]["decision"] == "out"]
        assert outs
        for t in outs:
            race, g = t["race"], t["generation"]
            assert len(race["pairs"]) == 4  # mu
            assert t["fitness"] < race["threshold"]
            assert t["fitness"] <= race["estimate"]
            for j, lower, upper, eps in race["pairs"]:
                assert upper < eps
                other = trials[g, j]["race"]
                total = np.zeros(2)
                for task in METRIC:  # compared on the common prefix of the two
                    n = min(len(race["scores"][task]), len(other["scores"][task]))
                    x, y = race["scores"][task][:n], other["scores"][task][:n]
                    lo, hi = difference_bounds(
                        x,
                        y,
                        ITEMS,
                        (1 - cfg.fitness.racing.confidence) / 2,
                        METRIC[task] != "score",
                    )
                    total += np.array([lo, hi]) / 2  # the objective: the tasks' mean
                assert total == pytest.approx([lower, upper], abs=1e-6)
                if racing:  # certainty: really worse than each of them, on every item
                    truth = full_fitness(cfg, t["recipe"])
                    assert truth < full_fitness(cfg, trials[g, j]["recipe"])


def test_journal_holds_a_stopped_candidate_as_a_complete_trial(tiny_zoo, tmp_path):
    """A stopped candidate is COMPLETE with the items it was scored on, its estimate and the
    bounds that stopped it; the report counts items per generation against full evaluation's;
    the final rescoring of the best scores every item, never a chunk."""
    cfg = _config(tiny_zoo, {})
    executor = Scripted(cfg)
    run = RunDir.create(tmp_path / "r", cfg)
    run_search(run, lambda: executor)
    trials = RunDir.reopen(tmp_path / "r").trials()
    stopped = [t for t in trials.values() if t["race"]["decision"] in ("out", "settled")]
    assert stopped
    for t in stopped:
        race = t["race"]
        assert t["status"] == Status.COMPLETE.value
        assert race["items"] < race["of"] == 2 * ITEMS
        assert t["examples"] == race["items"] == sum(len(v) for v in race["scores"].values())
        assert race["scored"] >= race["items"]
        assert race["pairs"] and np.isfinite(race["estimate"])
        assert t["counts"] == {task: len(v) for task, v in race["scores"].items()}
    rescored = [t for t in executor.seen if t.items == "rescore"]
    assert len(rescored) == 5 and all(t.chunk is None and t.shard is None for t in rescored)
    assert all(t["rescored"]["examples"] == 2 * ITEMS for t in trials.values() if "rescored" in t)

    table = summarize(run, trials_frame(run))["racing: items per generation"]
    for g in range(1, 7):
        generation = [t for (tg, _), t in trials.items() if tg == g]
        assert table.loc[g, "items scored"] == sum(t["race"]["scored"] for t in generation)
        assert table.loc[g, "items full evaluation"] == 8 * 2 * ITEMS
        assert table.loc[g, "out"] == sum(t["race"]["decision"] == "out" for t in generation)
    assert table.loc["all", "items full evaluation"] == 48 * 2 * ITEMS
    assert table.loc["all", "ratio"] < 1


@pytest.mark.parametrize("stop_after", [3, 13, 30])
def test_resume_with_racing_is_exact(tiny_zoo, tmp_path, stop_after):
    """Killed anywhere (mid-race: some candidates journaled, the rest racing), the resumed
    search journals what an uninterrupted one does, down to every race's fields."""
    cfg = _config(tiny_zoo, {})
    best_ref, ref = _search(tmp_path / "ref", cfg)
    with pytest.raises(Stop):
        _search(tmp_path / "cut", cfg, stop_after=stop_after)
    best, cut = _search(tmp_path / "cut", cfg, workers=3, arrival_seed=9)
    assert sorted(cut) == sorted(ref)
    for key, t in ref.items():
        for field in ("x", "fitness", "status", "examples"):
            assert cut[key][field] == t[field], (key, field)
        # every field of the race but `scored`, which counts the chunks this run's workers
        # scored ahead and lost to a stop (more workers, more of them): cost, not decision
        assert {**cut[key]["race"], "scored": 0} == {**t["race"], "scored": 0}
    assert best["fitness"] == best_ref["fitness"]


def test_more_workers_than_candidates_take_the_next_chunks(tiny_zoo, tmp_path):
    """16 workers, 8 candidates: idle workers take a racing candidate's later chunks, or pieces
    of them, at once (several of one candidate in flight together), and the search decides as
    on one worker; with `fitness.shards: off` chunks are never split, and it decides the same."""
    cfg = _config(tiny_zoo, {})
    _, one = _search(tmp_path / "one", cfg, workers=1)
    executor = Scripted(cfg, 16, 5)
    run = RunDir.create(tmp_path / "many", cfg)
    run_search(run, lambda: executor)
    many = RunDir.reopen(tmp_path / "many").trials()
    assert executor.concurrent_chunks >= 3
    assert any(t.shard for t in executor.seen)  # late chunks split between free workers
    unsplit = Scripted(
        cfg.model_copy(update={"fitness": cfg.fitness.model_copy(update={"shards": "off"})}), 16, 5
    )
    run_search(RunDir.create(tmp_path / "unsplit", unsplit.config), lambda: unsplit)
    assert unsplit.seen and not any(t.shard for t in unsplit.seen)  # fitness.shards: off
    whole = RunDir.reopen(tmp_path / "unsplit").trials()
    for key, t in one.items():
        for other in (many, whole):
            assert (other[key]["fitness"], other[key]["race"]["decision"]) == (
                t["fitness"],
                t["race"]["decision"],
            )


def test_racing_off_is_full_evaluation(tiny_zoo, tmp_path):
    """Off (the default), no trial carries a race and every item is scored."""
    _, trials = _search(tmp_path / "r", _config(tiny_zoo, None))
    assert all("race" not in t and t["examples"] == 2 * ITEMS for t in trials.values())
    run = RunDir.reopen(tmp_path / "r")
    assert "racing: items per generation" not in summarize(run, trials_frame(run))


def test_tasks_that_cannot_race_stop_the_search_with_one_line(tiny_zoo, tmp_path):
    """A corpus-level metric (BLEU, perplexity) has no per-item scores to bound: the first
    chunk's answer stops the search with one line, instead of failing every candidate."""
    cfg = _config(tiny_zoo, {})

    class Corpus(Scripted):
        def score(self, trial):
            return (
                TrialResult.failed(NOT_RACEABLE, "w")
                if trial.chunk is not None
                else (super().score(trial))
            )

    run = RunDir.create(tmp_path / "r", cfg)
    with pytest.raises(EvomergeError, match="fitness.racing needs metrics") as e:
        run_search(run, lambda: Corpus(cfg))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "racing, cma, error",
    [
        ({"enabled": True}, {"active": True}, "cma.active: racing decides only"),
        ({"confidence": 0}, {}, "confidence"),
        ({"confidence": 1.5}, {}, "confidence"),
        ({"chunks": 0}, {}, "chunks"),
        ({"first_chunk": 0}, {}, "first_chunk"),
        ({"tolerance": -1}, {}, "tolerance"),
        ({"confidance": 0.9}, {}, "confidance"),
    ],
)
def test_wrong_racing_settings_are_refused(tiny_zoo, racing, cma, error):
    """Each wrong setting: one line naming it."""
    data = _config(tiny_zoo, None).dump()
    data["fitness"]["racing"] = racing
    data["cma"] |= cma
    with pytest.raises(EvomergeError, match=error) as e:
        SearchConfig.parse(data)
    assert "\n" not in str(e.value).strip()


def test_racing_true_is_racing_with_its_defaults(tiny_zoo):
    data = _config(tiny_zoo, None).dump()
    data["fitness"]["racing"] = True
    rc = SearchConfig.parse(data).fitness.racing
    assert rc.enabled and rc == RacingConfig(enabled=True)


@pytest.mark.parametrize("workers,popsize", [(4, 2), (16, 8), (32, 12)])
def test_workers_stay_busy_when_they_outnumber_the_candidates(tiny_zoo, tmp_path, workers, popsize):
    """The schedule alone, on a virtual clock (a chunk's time its items, a merge 5 items' time,
    cancellation at the next batch): with more workers than candidates, racing keeps them >= 90 %
    busy over the generations (pieces of the deciding round, then the next rounds' pieces), and
    the search ends sooner than full evaluation without sharding (half the workers idle)."""
    spans = {}
    for racing in ({}, None):
        cfg = _config(tiny_zoo, racing, popsize=popsize, budget=8 * popsize)
        executor = Clocked(cfg, workers)
        run_search(RunDir.create(tmp_path / f"{racing is None}", cfg), lambda e=executor: e)
        spans[racing is None] = executor.span
        if racing is not None:
            assert executor.busy / (workers * executor.span) >= 0.9
            assert executor.used / executor.busy >= 0.7  # scoring ahead wastes some of it
    assert spans[False] < 0.5 * spans[True]
