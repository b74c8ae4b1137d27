"""Racing (search/loop/racing.py) through the real driver and CMA-ES, with a model-free executor.

`Scripted` scores a candidate from its recipe alone (each task's skill a seeded function of the
recipe, each item a seeded draw with that chance), so a search takes seconds, candidates differ
widely, and full evaluation's score of every candidate is known exactly: a decision racing made
can be checked against the truth, not only against racing's own bookkeeping."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace

import numpy as np
import pytest

from evomerge.fitness.bounds import chunk_ends, chunk_fractions, difference_bounds, piece
from evomerge.fitness.scorer import objective
from evomerge.merge.errors import EvomergeError
from evomerge.search.config import RacingConfig, SearchConfig
from evomerge.search.loop.driver import run_search
from evomerge.search.loop.racing import NOT_RACEABLE
from evomerge.search.loop.schedule import Cancelled, Died, Done, Scheduler
from evomerge.search.loop.workers import combine_trial
from evomerge.search.outputs.report import summarize, trials_frame
from evomerge.search.run.rundir import RunDir
from evomerge.search.trial import ItemScores, Status, Trial, TrialResult
from tests.conftest import Stop, search_config, stopping_after

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
        if trial.chunk is None:  # a shard: a contiguous piece of every task, as Scorer.shard
            a, b = piece(ITEMS, *trial.shard) if trial.shard else (0, ITEMS)
            docs = {t: list(range(a, b)) for t in METRIC}
        else:
            docs = {}
            for task in METRIC:
                order = list(range(ITEMS))
                random.Random(f"{self.config.cma.seed}/{trial.generation}/{task}").shuffle(order)
                batch = self.config.fitness.batch_size if rc.whole_batches else 1
                ends = chunk_ends(ITEMS, chunk_fractions(rc.first_chunk, rc.chunks), batch)
                c = trial.chunk
                chunk = order[(ends[c - 1] if c else 0) : ends[c]]
                a, b = piece(len(chunk), *trial.shard) if trial.shard else (0, len(chunk))
                docs[task] = chunk[a:b]
        scores = {t: [item_score(trial.recipe, t, d) for d in ds] for t, ds in docs.items()}
        metrics = {  # an empty chunk's metric 0, as the Scorer's
            f"{t}/{METRIC[t]}": sum(v for _, v in sorted(zip(docs[t], s, strict=True)))
            / max(1, len(s))
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


class Clocked(Scheduler):
    """The production scheduler (search/loop/schedule.py) on a virtual clock, its workers Scripted:
    a trial takes `item` time units per item it scores, times the candidate's own pace (1 +-
    `spread`, seeded by its key: some candidates answer at more length), plus `merge` units
    when its worker holds another recipe; a cancelled trial ends at its next batch. Counts, over
    the search's generations alone: `busy` and `used` (busy on results that were used), `span`,
    the merges, the candidates, and the item-batches scored (a partial batch a whole one)."""

    def __init__(self, config, workers: int, merge=5.0, spread=0.0, seed=0, die_at=None):
        super().__init__(combine=lambda parts: combine_trial(config, parts))
        self.seed, self.die_at, self.replaced = seed, die_at, 0  # die_at: a launch count
        self.scripted = Scripted(config, workers)
        self.workers, self.shards = workers, config.fitness.shards
        self.merge, self.spread, self.batch = merge, spread, config.fitness.batch_size
        self.clock = self.busy = self.used = self.span = 0.0
        self.merges = self.batches = 0
        self.candidates: set = set()
        self.held: dict[int, dict] = {}  # worker -> the recipe in its model
        self.jobs: dict[int, list] = {}  # job -> [end, started, result, cancelled, timed]
        self.idle = list(range(workers))
        self.timed = self.inside = False
        self.launched = 0
        self.log: list = []

    def shardable(self) -> bool:
        return True

    def now(self) -> float:
        return self.clock

    def launch(self, worker, trial):
        result = self.scripted.score(trial)
        merge = self.merge if self.held.get(worker) != trial.recipe else 0.0
        self.held[worker] = trial.recipe
        pace = 1 + self.spread * (2 * _uniform(trial.key, "pace", self.seed) - 1)
        seconds = pace * result.examples
        result = replace(result, merge_seconds=merge, eval_seconds=seconds)
        timed = self.timed and trial.generation > 0 and trial.items == "search"
        if timed:
            self.log.append(
                (self.clock, worker, trial.key, trial.shard, trial.chunk, merge, seconds)
            )
            self.merges += merge > 0
            self.candidates.add(trial.key)
            self.batches += sum(-(-n // self.batch) for n in result.counts.values())
        job = self.launched = self.launched + 1
        self.jobs[job] = [self.clock + merge + seconds, self.clock, result, False, timed]
        return job

    def cancel(self, job) -> None:
        run = self.jobs[job]
        ran = self.clock - run[1]
        batch = self.batch * run[2].eval_seconds / max(1, run[2].examples)  # its duration
        if batch > 0:
            run[0] = min(run[0], run[1] + (ran // batch + 1) * batch)
        run[3] = True

    def _next(self):
        job = min(self.jobs, key=lambda j: self.jobs[j][0])
        end, started, result, cancelled, timed = self.jobs.pop(job)
        self.clock = end
        self.busy += (end - started) * timed
        return [Cancelled(job) if cancelled else Done(job, result)]

    def arrived(self, trial, result, wanted) -> None:
        if wanted and trial.generation > 0 and trial.items == "search":
            self.used += result.merge_seconds + result.eval_seconds

    def replace(self, worker, why: str) -> None:
        assert why == "killed", why  # only `die_at` kills a virtual worker
        self.replaced += 1
        self.idle.append(self.workers + self.replaced)  # a new worker, holding nothing

    def wait(self):
        if self.die_at is not None and self.launched >= self.die_at and self.jobs:
            self.die_at = None
            job = max(self.jobs)  # the last launched: its worker is killed mid-trial
            self.jobs.pop(job)
            return [Died(job, "killed")]
        return self._next()

    def run(self, trials, on_result) -> None:
        timed = bool(trials) and trials[0].generation > 0 and trials[0].items == "search"
        self._within(timed, lambda: Scheduler.run(self, trials, on_result))

    def stream(self, feed, on_result) -> None:
        if self.inside:  # run's own stream
            return Scheduler.stream(self, feed, on_result)
        self._within(True, lambda: Scheduler.stream(self, feed, on_result))  # a race

    def _within(self, timed: bool, go) -> None:
        """Run `go`, counting its time and work when it runs a generation's candidates (not
        the parents or the rescoring)."""
        start, self.inside, self.timed = self.clock, True, timed
        try:
            go()
        finally:
            self.inside = self.timed = False
        self.span += (self.clock - start) * timed


def _config(zoo, racing: dict | None, popsize: int = 8, budget: int = 48, active=None):
    fitness = {
        "tasks": [{"name": t, "metric": m} for t, m in METRIC.items()],
        "include": [str(zoo / "tasks")],
        "limit": ITEMS,
        "batch_size": 6,  # a chunk of the 5 below is 12 items: whole batches
    }
    if racing is not None:
        fitness["racing"] = {"enabled": True, "chunks": 5, "first_chunk": 0.2, **racing}
    cma = {"popsize": popsize, "budget": budget, "seed": 3, "sigma0": 0.3}
    if active is not None:
        cma["active"] = active
    return search_config(zoo, fitness=fitness, cma=cma, space={"method": "task_arithmetic"})


def _search(path, cfg, workers=1, arrival_seed=0, stop_after=None):
    run = RunDir.reopen(path, cfg) if (path / "run.yaml").exists() else RunDir.create(path, cfg)
    best = run_search(
        run, lambda: Scripted(run.config, workers, arrival_seed), stopping_after(stop_after)
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
    """The production schedule on a virtual clock (a chunk's time its items, a merge 5 items'
    time, cancellation at the next batch): with more workers than candidates, racing keeps them
    >= 90 % busy over the generations (pieces of the deciding round, then the next rounds'
    pieces); full evaluation shards its candidates to fill them, racing ends sooner still
    (fewer items scored), and without sharding full evaluation leaves workers idle."""
    spans, busy = {}, {}
    for mode, racing, shards in (
        ("race", {}, "auto"),
        ("full", None, "auto"),
        ("off", None, "off"),
    ):
        cfg = _config(tiny_zoo, racing, popsize=popsize, budget=8 * popsize)
        cfg = cfg.model_copy(update={"fitness": cfg.fitness.model_copy(update={"shards": shards})})
        executor = Clocked(cfg, workers)
        run_search(RunDir.create(tmp_path / mode, cfg), lambda e=executor: e)
        spans[mode], busy[mode] = executor.span, executor.busy / (workers * executor.span)
        if mode == "race":
            assert executor.used / executor.busy >= 0.7  # scoring ahead wastes some of it
    assert busy["race"] >= 0.9
    # whole shards: 12 candidates on 32 workers are 8 in 3 shards and 4 in 2 (1/3 longer)
    assert busy["full"] >= 0.75 and busy["off"] <= popsize / workers + 0.05
    assert spans["race"] < spans["full"] < spans["off"]


def test_a_generation_keeps_every_worker_busy_to_its_end(tiny_zoo, tmp_path):
    """8 workers, popsize 18 (the default 7B TIES genome's), full evaluation, candidates whose
    answers take +-50 % of the mean time: the generation's tail (18 mod 8 = 2 candidates) is
    sharded over the workers that would idle beside it, so the workers stay >= 90 % busy, where
    whole candidates run in waves of 8, 8, 2 (about 75 %); every candidate's score is its
    unsharded one, so the search is the same search."""
    out = {}
    for shards in ("auto", "off"):
        cfg = _config(tiny_zoo, None, popsize=18, budget=18 * 6)
        cfg = cfg.model_copy(update={"fitness": cfg.fitness.model_copy(update={"shards": shards})})
        executor = Clocked(cfg, 8, spread=0.5)
        run_search(RunDir.create(tmp_path / shards, cfg), lambda e=executor: e)
        out[shards] = executor.busy / (8 * executor.span), RunDir.reopen(tmp_path / shards)
    (auto, auto_run), (off, off_run) = out["auto"], out["off"]
    assert auto >= 0.9 > 0.8 > off
    a, b = auto_run.trials(), off_run.trials()
    assert a.keys() == b.keys() and len(a) == 108
    for key in a:
        assert a[key]["x"] == b[key]["x"]
        assert a[key]["fitness"] == pytest.approx(b[key]["fitness"], abs=1e-12)


@pytest.mark.parametrize("merge,most", [(30.0, 1.2), (1.0, None)])
def test_racing_keeps_a_candidate_on_the_worker_that_holds_it(tiny_zoo, tmp_path, merge, most):
    """8 workers, popsize 18, racing at its defaults (10 chunks), whole batches of 8: when a
    merge costs more than the evaluation it risks (30 units: ~2.5 chunks, a 7B merge beside a
    vLLM chunk), a worker scores the next chunks of the candidate it holds: <= 1.2 merges per
    candidate, where lowest-round-first moves every candidate on every round. When merges are
    cheap (1 unit) the race goes round by round again. Either way racing scores fewer item
    batches than full evaluation (a partial batch costs a whole one), and decides as it would
    on any schedule (the same candidates told the same values as a serial race)."""
    figures = {}
    for mode in ("race", "full"):
        cfg = _config(tiny_zoo, {"chunks": 10, "first_chunk": 0.1} if mode == "race" else None)
        data = cfg.dump()
        data["cma"] |= {"popsize": 18, "budget": 18 * 4}
        data["fitness"]["batch_size"] = 8
        cfg = SearchConfig.parse(data)
        executor = Clocked(cfg, 8, merge=merge)
        run_search(RunDir.create(tmp_path / mode, cfg), lambda e=executor: e)
        figures[mode] = executor.merges / len(executor.candidates), executor.batches
    (merges, batches), (_, full_batches) = figures["race"], figures["full"]
    assert batches < full_batches
    if most is not None:
        assert merges <= most
    else:
        assert merges > 1.5  # cheap merges: the lowest round first, whoever holds what
    serial = _config(tiny_zoo, {"chunks": 10, "first_chunk": 0.1})
    data = serial.dump()
    data["cma"] |= {"popsize": 18, "budget": 18 * 4}
    data["fitness"]["batch_size"] = 8
    _, reference = _search(tmp_path / "serial", SearchConfig.parse(data))
    raced = RunDir.reopen(tmp_path / "race").trials()
    assert {k: t["fitness"] for k, t in raced.items()} == {
        k: t["fitness"] for k, t in reference.items()
    }


def test_a_run_from_before_whole_batches_resumes_its_own_chunks(tiny_zoo, tmp_path):
    """A run directory whose config predates `racing.whole_batches` raced unrounded chunks: it
    reopens with them (also under a config that leaves the field unset) and resumes to the
    journal an uninterrupted run of unrounded chunks writes; new runs round to whole batches."""
    import yaml

    cfg = _config(tiny_zoo, CERTAIN)
    data = cfg.dump()
    data["fitness"]["batch_size"] = 8  # 12-item chunks: rounding would move them
    data["fitness"]["racing"]["whole_batches"] = False
    unrounded = SearchConfig.parse(data)
    _, reference = _search(tmp_path / "ref", unrounded)
    data["fitness"]["racing"].pop("whole_batches")
    new = SearchConfig.parse(data)
    assert new.fitness.racing.whole_batches  # the default for new runs
    with pytest.raises(Stop):  # an evomerge from before the field: unrounded chunks
        _search(tmp_path / "old", unrounded, stop_after=20)
    meta = yaml.safe_load((tmp_path / "old" / "run.yaml").read_text())
    del meta["config"]["fitness"]["racing"]["whole_batches"]  # as written before the field
    (tmp_path / "old" / "run.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    assert not RunDir.reopen(tmp_path / "old", new).config.fitness.racing.whole_batches
    _, resumed = _search(tmp_path / "old", new)
    assert {k: (t["fitness"], t["race"]["round"]) for k, t in resumed.items()} == {
        k: (t["fitness"], t["race"]["round"]) for k, t in reference.items()
    }


@pytest.mark.parametrize("die_at", [3, 8, 40])
def test_a_worker_that_dies_mid_race_leaves_no_candidate_unscored(tiny_zoo, tmp_path, die_at):
    """Dear merges (workers leave a candidate to the worker holding it) and a worker killed
    mid-race: its trial runs again elsewhere, the race forgets what it held, and every
    candidate is still decided, as a serial race decides it."""
    data = _config(tiny_zoo, {"chunks": 10, "first_chunk": 0.1}).dump()
    data["cma"] |= {"popsize": 8, "budget": 8 * 3}
    data["fitness"]["batch_size"] = 8
    cfg = SearchConfig.parse(data)
    executor = Clocked(cfg, 4, merge=30.0, die_at=die_at)
    run_search(RunDir.create(tmp_path / "race", cfg), lambda: executor)
    assert executor.replaced == 1
    _, reference = _search(tmp_path / "serial", cfg)
    raced = RunDir.reopen(tmp_path / "race").trials()
    assert {k: t["fitness"] for k, t in raced.items()} == {
        k: t["fitness"] for k, t in reference.items()
    }
