"""The search loop. The driver alone owns the optimizer, the journal and the run directory.

Per generation: ask (seeded by run seed and generation), journal every candidate as ASKED
before dispatch, run the unfinished ones, journal each result as it arrives, tell. Resuming is
the same loop from the start: the optimizer is rebuilt from the config, and for every
generation the journal already finished it asks the same vectors, takes the results from the
journal and tells them again; only unfinished trials are dispatched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from evomerge.fitness.bounds import chunk_fractions
from evomerge.merge.errors import EvomergeError
from evomerge.search.loop import racing
from evomerge.search.loop.optimizer import Optimizer, RandomSearch
from evomerge.search.run.rundir import RunDir
from evomerge.search.spaces import space_for
from evomerge.search.spaces.space import SearchSpace
from evomerge.search.trial import Executor, Status, Trial, TrialRecord, TrialResult


def trial_seed(run_seed: int, generation: int, index: int) -> int:
    """The seed of a candidate's random masks (DARE, DELLA): stable across resumes."""
    return (run_seed * 1_000_003 + generation * 10_007 + index) % (2**31)


@dataclass
class Progress:
    """What the progress display is told; the CLI renders it, tests ignore it."""

    # evaluations done, budget, best fitness so far, the parents' search-split fitness
    on_start: Callable[[int, int, float, dict[str, float]], None] = lambda *a: None
    # every finished trial's result record, as journaled (a decode failure included)
    on_result: Callable[[int, TrialRecord, float], None] = lambda done, record, best: None
    on_generation: Callable[[str], None] = lambda line: None
    # a generation's trials once all are finished (not for generations replayed from the
    # journal: observers that need those read the journal at on_start)
    on_generation_end: Callable[[int, list[TrialRecord]], None] = lambda g, trials: None
    # the winner when the search ends (after rescoring), also when a finished run is resumed
    on_finish: Callable[[TrialRecord | None], None] = lambda best: None


def new_optimizer(run: RunDir, space: SearchSpace) -> Optimizer | RandomSearch:
    c = run.config.cma
    sampler = RandomSearch if c.sampler == "random" else Optimizer
    return sampler(
        space.x0(),
        c.sigma0,
        space.bounds(),
        c.seed,
        c.popsize,
        diagonal=space.dim > c.diagonal_above,
        active=c.active if c.active is not None else not run.config.fitness.racing.enabled,
    )


def race_plan(config, opt: Optimizer | RandomSearch) -> racing.Plan:
    rc = config.fitness.racing
    return racing.Plan(
        chunk_fractions(rc.first_chunk, rc.chunks),
        rc.confidence,
        rc.tolerance,
        opt.mu,
        list(config.fitness.tasks),
        shards=config.fitness.shards,
        batch=config.fitness.batch_size if rc.whole_batches else 1,
    )


def run_search(
    run: RunDir, make_executor: Callable[[], Executor], progress: Progress | None = None
) -> TrialRecord | None:
    """Run (or resume) the search to its budget. Returns the best trial record, or None."""
    with run.lock():
        run.repair_journal()
        return _search(run, make_executor, progress or Progress())


class _Executor:
    """The executor, started on first use (a finished run resumed starts no workers)."""

    def __init__(self, make: Callable[[], Executor], log: Callable[[str], None]):
        self.make = make
        self.log = log
        self.started: Executor | None = None

    def start(self) -> Executor:
        if self.started is None:
            self.started = self.make()
            if hasattr(self.started, "log_to"):  # the workers' start-up lines
                self.started.log_to(self.log)
        return self.started

    def run(self, trials: list[Trial], on_result) -> None:
        if trials:
            self.start().run(trials, on_result)

    def shutdown(self) -> None:
        if self.started is not None:
            self.started.shutdown()


def _search(
    run: RunDir, make_executor: Callable[[], Executor], progress: Progress
) -> TrialRecord | None:
    config = run.config
    space = space_for(config)
    opt = new_optimizer(run, space)
    state = run.trials()
    ranked = run.ranked(state)
    best = ranked[0] if ranked else None
    done = sum(t.is_finished() for t in state.values())
    executor = _Executor(make_executor, run.log)
    costs = racing.Costs()  # what the races measured: where each chunk is cheapest to score
    try:
        parents = _score_parents(run, space, executor)
        progress.on_start(done, config.cma.budget, _fitness(best), parents)
        while opt.generation * opt.popsize < config.cma.budget and not opt.stop():
            g = opt.generation + 1
            xs = opt.ask()
            replayed = all((g, i) in state and state[g, i].is_finished() for i in range(len(xs)))
            asked = []
            for i, x in enumerate(xs):
                known = state.get((g, i))
                if known is not None:
                    _check_same(run, g, i, known, x)
                    continue
                record = {
                    "generation": g,
                    "index": i,
                    "status": Status.ASKED.value,
                    "x": [float(v) for v in x],
                    "time": time.time(),
                }
                try:
                    recipe = space.decode(x, seed=trial_seed(config.cma.seed, g, i))
                    record["recipe"] = recipe.model_dump(mode="json", exclude_none=True)
                except (ValueError, EvomergeError) as e:  # e.g. weights summing to zero
                    record.update(
                        status=Status.FAILED.value, fitness=config.penalty, error=f"decode: {e}"
                    )
                    done += 1
                # the line as built (its fields in this order are the journal's bytes)
                asked.append(TrialRecord.from_json(record))
                state[(g, i)] = asked[-1]
            if asked:
                run.append(asked)  # journaled before dispatch: a crash from here on loses nothing
            for r in asked:
                if r.status is Status.FAILED:  # undecodable: finished without running
                    progress.on_result(done, r, _fitness(best))
            pending = [
                Trial(g, i, state[(g, i)].recipe)
                for i in range(len(xs))
                if state[(g, i)].status is Status.ASKED
            ]

            def finish(key: tuple[int, int], fields: dict) -> None:
                nonlocal best, done
                ok = fields["status"] == Status.COMPLETE
                fitness = fields["fitness"] if ok else config.penalty
                record = TrialRecord.from_json(
                    {
                        "generation": key[0],
                        "index": key[1],
                        **fields,
                        "fitness": fitness,
                        "time": time.time(),
                    }
                )
                run.append([record])
                state[key] = state[key].merged(record)
                done += 1
                if ok and (best is None or fitness > _fitness(best)):
                    best = state[key]
                    run.write_best(best)
                progress.on_result(done, record, _fitness(best))

            if config.fitness.racing.enabled and pending:
                raced = {i: state[g, i] for i in range(len(xs)) if state[g, i].race is not None}
                racing.run_race(
                    executor.start(), race_plan(config, opt), pending, raced, finish, costs
                )
            else:
                executor.run(pending, lambda trial, result: finish(trial.key, result.as_dict()))
            opt.tell(xs, [_fitness(state[g, i]) for i in range(len(xs))])  # every one finished
            if not replayed:  # a replayed generation was logged by the session that ran it
                trials = [state[(g, i)] for i in range(len(xs))]
                line = summary_line(g, trials, best, done, config.cma.budget)
                run.log(line)
                progress.on_generation(line)
                progress.on_generation_end(g, trials)
        winner = _rescore(run, state, executor, progress) or best
        progress.on_finish(winner)
        return winner
    finally:
        executor.shutdown()


def _score_parents(run: RunDir, space: SearchSpace, executor: _Executor) -> dict[str, float]:
    """The parents' fitness on the search split (measured once, kept in parents.json)."""
    scores = run.parents()
    references = space.references()
    if references and not scores:
        labels = list(references)
        trials = [
            Trial(0, k, r.model_dump(mode="json", exclude_none=True))
            for k, r in enumerate(references.values())
        ]

        def on_result(trial: Trial, result: TrialResult) -> None:
            ok = result.status == Status.COMPLETE
            scores[labels[trial.index]] = {
                "fitness": result.fitness if ok else None,
                "metrics": result.metrics,
                **({} if ok else {"error": result.error}),
            }

        executor.run(trials, on_result)
        run.write_parents(scores)
    return {k: v["fitness"] for k, v in scores.items() if v.get("fitness") is not None}


def _fitness(best: TrialRecord | None) -> float:
    return best.fitness if best is not None and best.fitness is not None else math.nan


def _rescore(
    run: RunDir,
    state: dict[tuple[int, int], TrialRecord],
    executor: _Executor,
    progress: Progress,
) -> TrialRecord | None:
    """Score the best few candidates again on more search items and return the best of that
    second score (None when rescoring is off): picking the maximum of many noisy scores of the
    same items overrates the winner. Each result is journaled, so a resumed run goes on."""
    fc = run.config.fitness
    if fc.rescore.top == 0 or fc.limit is None:
        return None
    top = sorted(
        (t for t in state.values() if t.status is Status.COMPLETE),
        key=lambda t: (-_fitness(t), t.generation, t.index),
    )[: fc.rescore.top]
    pending = [
        Trial(t.generation, t.index, t.recipe, items="rescore") for t in top if t.rescored is None
    ]

    def on_result(trial: Trial, result: TrialResult) -> None:
        ok = result.status == Status.COMPLETE
        rescored: dict = {
            "fitness": result.fitness if ok else None,
            "examples": result.examples,
            "worker": result.worker,
            "time": time.time(),
        }
        rescored |= {"metrics": result.metrics} if ok else {"error": result.error}
        # an annotation: the trial's own fields (time, worker) stay those of its search run
        record = TrialRecord(trial.generation, trial.index, rescored=rescored)
        run.append([record])
        state[trial.key] = state[trial.key].merged(record)

    executor.run(pending, on_result)
    ranked = run.ranked(state)
    winner = ranked[0] if ranked else None
    if pending and winner is not None and winner.rescored is not None:
        run.write_best(winner)
        line = (
            f"rescored the top {len(top)} on more search items: winner {winner.generation}:"
            f"{winner.index} (search {_fitness(winner):.4f}, rescored "
            f"{winner.rescored['fitness']:.4f})"
        )
        run.log(line)
        progress.on_generation(line)
    return winner


def _check_same(run: RunDir, g: int, i: int, known: TrialRecord, x: np.ndarray) -> None:
    """A journaled trial must be what the replayed optimizer asks (to rounding: another BLAS
    may differ in the last bits); anything else means the journal was edited."""
    stored = np.asarray(known.x if known.x is not None else [], dtype=float)
    if stored.shape != x.shape or not np.allclose(stored, x, rtol=1e-9, atol=1e-9):
        raise EvomergeError(
            f"{run.journal_path}: trial {g}:{i} differs from what the optimizer asks on replay; "
            "the journal was edited or written by another config; start a new run directory"
        )


def summary_line(
    g: int, trials: list[TrialRecord], best: TrialRecord | None, done: int, budget: int
) -> str:
    ok = [_fitness(t) for t in trials if t.status is Status.COMPLETE]
    failed = sum(t.status is Status.FAILED for t in trials)
    mean = sum(ok) / len(ok) if ok else math.nan
    gen_best = max(ok) if ok else math.nan
    overall = _fitness(best)
    return (
        f"gen {g:4d}  evals {done}/{budget}  gen best {gen_best:.4f}  gen mean {mean:.4f}  "
        f"failed {failed}  best {overall:.4f}"
    )
