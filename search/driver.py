"""The search loop. The driver alone owns the optimizer, the journal and the run directory.

Per generation: ask (seeded by run seed and generation), journal every candidate as ASKED
before dispatch, run the unfinished ones, journal each result as it arrives, tell, snapshot.
Resuming replays the same steps from the last snapshot: asked vectors come out identical,
finished trials are taken from the journal, and only unfinished ones are dispatched again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evomerge.merge.architecture import ModelInfo
from evomerge.merge.errors import EvomergeError
from evomerge.merge.recipe import PS
from evomerge.search.dfs_genome import DFSGenome
from evomerge.search.genome import GenomeSpec
from evomerge.search.optimizer import Optimizer
from evomerge.search.rundir import ASKED, COMPLETE, FAILED, RunDir
from evomerge.search.trial import Trial, TrialResult


def trial_seed(run_seed: int, generation: int, index: int) -> int:
    """The seed of a candidate's random masks (DARE, DELLA): stable across resumes."""
    return (run_seed * 1_000_003 + generation * 10_007 + index) % (2**31)


@dataclass
class Progress:
    """What the progress display is told; the CLI renders it, tests ignore it."""

    on_start: Callable[[int, int], None] = lambda done, budget: None
    on_result: Callable[[int, dict, float], None] = lambda done, record, best: None
    on_generation: Callable[[str], None] = lambda line: None


def genome_for(run: RunDir) -> GenomeSpec | DFSGenome:
    cfg = run.config
    if cfg.dfs is not None:
        ps = cfg.ps_recipe() if cfg.dfs.ps_recipe else None
        layers = {}
        for alias in {*cfg.dfs.models, cfg.dfs.embed_from}:
            path = (
                Path(ps.models[ps.main_alias].path) if alias == PS and ps else cfg.model_path(alias)
            )
            layers[alias] = ModelInfo.from_dir(path).num_layers
        return DFSGenome(cfg, layers, ps)
    info = ModelInfo.from_dir(cfg.model_path(cfg.base))
    try:
        return GenomeSpec(cfg, info.num_layers)
    except ValueError as e:
        raise EvomergeError(f"space: {e}") from None


def new_optimizer(run: RunDir, genome: GenomeSpec | DFSGenome) -> Optimizer:
    c = run.config.cma
    return Optimizer(
        genome.x0(),
        c.sigma0,
        genome.bounds(),
        c.seed,
        c.popsize,
        diagonal=genome.dim > c.diagonal_above,
    )


def run_search(
    run: RunDir, make_executor: Callable[[], object], progress: Progress | None = None
) -> dict | None:
    """Run (or resume) the search to its budget. Returns the best trial record, or None."""
    progress = progress or Progress()
    config = run.config
    genome = genome_for(run)
    snap = run.latest_snapshot()
    opt = Optimizer.load(snap[1]) if snap else new_optimizer(run, genome)
    state = run.trials()
    finished = [t for t in state.values() if t["status"] in (COMPLETE, FAILED)]
    best = max(
        (t for t in finished if t["status"] == COMPLETE), key=lambda t: t["fitness"], default=None
    )
    done = len(finished)
    progress.on_start(done, config.cma.budget)
    executor = None
    try:
        while opt.generation * opt.popsize < config.cma.budget and not opt.stop():
            g = opt.generation + 1
            xs = opt.ask()
            asked = []
            for i, x in enumerate(xs):
                known = state.get((g, i))
                if known is not None:
                    if not np.allclose(known["x"], x, rtol=0, atol=1e-12):
                        raise EvomergeError(
                            f"{run.journal_path}: trial {g}:{i} differs from what "
                            "the optimizer asks; the journal or snapshot was edited"
                        )
                    continue
                record = {
                    "generation": g,
                    "index": i,
                    "status": ASKED,
                    "x": [float(v) for v in x],
                    "time": time.time(),
                }
                try:
                    recipe = genome.decode(x, seed=trial_seed(config.cma.seed, g, i))
                    record["recipe"] = recipe.model_dump(
                        mode="json", by_alias=True, exclude_none=True
                    )
                except EvomergeError as e:  # e.g. weights summing to zero: a failed candidate
                    record.update(status=FAILED, fitness=config.penalty, error=f"decode: {e}")
                    done += 1
                asked.append(record)
                state[(g, i)] = record
            run.append(asked)  # journaled before dispatch: a crash from here on loses nothing
            pending = [
                Trial(g, i, state[(g, i)]["recipe"])
                for i in range(len(xs))
                if state[(g, i)]["status"] == ASKED
            ]
            if pending and executor is None:
                executor = make_executor()

            def on_result(trial: Trial, result: TrialResult, g=g) -> None:
                nonlocal best, done
                fitness = result.fitness if result.status == COMPLETE else config.penalty
                record = {
                    "generation": trial.generation,
                    "index": trial.index,
                    "status": result.status,
                    **result.as_dict(),
                    "fitness": fitness,
                    "time": time.time(),
                }
                run.append([record])
                state[trial.key] = {**state[trial.key], **record}
                done += 1
                if result.status == COMPLETE and (best is None or fitness > best["fitness"]):
                    best = state[trial.key]
                    run.write_best(best)
                progress.on_result(done, record, best["fitness"] if best else math.nan)

            if pending:
                executor.run(pending, on_result)  # type: ignore[attr-defined]
            fits = [state[(g, i)]["fitness"] for i in range(len(xs))]
            opt.tell(xs, fits)
            opt.save(run.snapshot_path(g))
            line = summary_line(
                g, [state[(g, i)] for i in range(len(xs))], best, done, config.cma.budget
            )
            run.log(line)
            progress.on_generation(line)
    finally:
        if executor is not None:
            executor.shutdown()  # type: ignore[attr-defined]
    return best


def summary_line(g: int, trials: list[dict], best: dict | None, done: int, budget: int) -> str:
    ok = [t["fitness"] for t in trials if t["status"] == COMPLETE]
    failed = sum(t["status"] == FAILED for t in trials)
    mean = sum(ok) / len(ok) if ok else math.nan
    gen_best = max(ok) if ok else math.nan
    overall = best["fitness"] if best else math.nan
    return (
        f"gen {g:4d}  evals {done}/{budget}  gen best {gen_best:.4f}  gen mean {mean:.4f}  "
        f"failed {failed}  best {overall:.4f}"
    )
