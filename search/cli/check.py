"""Refuse a search early: everything that could fail hours in, the workers' memory included,
checked before any compute; every problem reported, one line each, not the first only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.merge.errors import EvomergeError
from evomerge.search.config import SearchConfig

if TYPE_CHECKING:
    from evomerge.fitness.scorer import Scorer
    from evomerge.search.memory import MemoryPlan


@dataclass
class Checked:
    """What `check_search` found: every problem, one line each, and the memory plan (None when
    the models or the search space could not be read)."""

    problems: list[str]
    plan: MemoryPlan | None = None


def check_search(cfg: SearchConfig, run_dir: Path | None) -> list[str]:
    return check_search_plan(cfg, run_dir).problems


def check_search_plan(cfg: SearchConfig, run_dir: Path | None) -> Checked:
    from evomerge.fitness.models import check_loadable
    from evomerge.merge.engine import check_compatible
    from evomerge.merge.io.checkpoint import Checkpoint

    problems: list[str] = []
    ckpts = {}
    for alias in cfg.models:
        try:
            check_loadable(cfg.model_path(alias), label=f"models.{alias}")
            ckpts[alias] = Checkpoint(cfg.model_path(alias), label=f"models.{alias}")
        except EvomergeError as e:
            problems.append(str(e))
    space_ok = False
    if len(ckpts) == len(cfg.models):
        try:
            check_compatible(ckpts, reference=cfg.base)
        except EvomergeError as e:
            problems.append(str(e))
        else:
            space_problems = _check_space(cfg)
            problems += space_problems
            space_ok = not space_problems
    task_problems, scorer = _check_tasks(cfg)
    problems += task_problems
    problems += _check_workers(cfg)
    plan = None
    if space_ok:  # the plan reads the models and the space: only once both are sound
        plan = _memory_plan(cfg, scorer)
        # unmeasured, the KV cache and logits are sized at a guessed length: refuse only what
        # does not fit even at one token (the tasks' problem is reported on its own)
        line = plan.problem() if plan.sequence.measured else plan.replan(tokens=1).problem()
        if line is not None:
            problems.append(line)
    if run_dir is not None:
        problems += _check_run_dir(Path(run_dir))
    return Checked(problems, plan)


def _memory_plan(cfg: SearchConfig, scorer: Scorer | None) -> MemoryPlan:
    """The memory plan at the length of the longest request a worker will score (the search
    items, and the rescoring items when the best are rescored), tokenized as the base's
    tokenizer does; lm-eval's default context when the tasks did not load."""
    from evomerge.fitness.models import load_tokenizer
    from evomerge.search.memory import SequenceLength, plan_memory

    sequence = SequenceLength.default("the tasks did not load")
    if scorer is not None:
        try:
            tokenizer = load_tokenizer(cfg.model_path(cfg.base))
            longest = scorer.longest_request(tokenizer, cfg.scored_items())
            sequence = SequenceLength.of_tasks(*longest)
        except Exception as e:  # noqa: BLE001 - the plan still prints, at the stated default
            first = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
            sequence = SequenceLength.default(f"the requests could not be measured: {first}")
    return plan_memory(cfg, sequence)


def _check_space(cfg: SearchConfig) -> list[str]:
    from evomerge.search.spaces import space_for

    try:
        space = space_for(cfg)
    except (ValueError, EvomergeError) as e:
        return [str(e) if str(e).startswith(("space", "dfs")) else f"space: {e}"]
    problems = space.problems()
    popsize = cfg.cma.popsize or 4 + int(3 * math.log(max(space.dim, 1)))
    if cfg.cma.budget < popsize:
        problems.append(
            f"cma.budget: {cfg.cma.budget} evaluations is less than one generation "
            f"(popsize {popsize}, genome of {space.dim} genes); raise the budget"
        )
    elif space.dim > cfg.cma.diagonal_above and cfg.cma.budget < 10 * popsize:
        problems.append(
            f"cma.budget: {cfg.cma.budget} evaluations for {space.dim} genes is under 10 "
            "generations; expect little progress (raise the budget or coarsen the genome)"
        )
    return problems


def _check_tasks(cfg: SearchConfig) -> tuple[list[str], Scorer | None]:
    """Every task loads (its dataset downloaded here, on the driver, or found in the cache when
    offline); each one that does not is named. Returns the problems and the search tasks'
    Scorer, built as a worker builds it (the memory plan measures its requests), or None."""

    problems = [
        f"fitness.include: {path} is not a directory of task YAMLs"
        for path in cfg.include_paths()
        if not path.is_dir()
    ]
    if problems:
        return problems, None
    fc = cfg.fitness
    sets = [(fc.tasks, "search"), (cfg.heldout_specs(), "heldout")]

    def load(specs, part) -> Scorer:
        return cfg.scorer(specs, part)

    search = None
    for specs, part in sets:
        try:
            scorer = load(specs, part)
        except EvomergeError as e:
            return [f"fitness.tasks: {line}" for line in str(e).splitlines()], None
        except Exception:  # noqa: BLE001 - a task that fails to load: find which, name each
            for spec in specs:
                try:
                    load([spec], part)
                except Exception as e:  # noqa: BLE001
                    first = str(e).splitlines()[0] if str(e) else type(e).__name__
                    problems.append(f"fitness.tasks: {spec.name}: cannot load: {first}")
        else:
            search = scorer if part == "search" else search
    return list(dict.fromkeys(problems)), search if not problems else None


def _check_workers(cfg: SearchConfig) -> list[str]:
    import torch

    wc = cfg.workers
    if wc.device == "cuda" and wc.address is None and not torch.cuda.is_available():
        return ["workers.device: cuda, but this machine has no CUDA device; use auto or cpu"]
    visible = torch.cuda.device_count() if wc.address is None and wc.device != "cpu" else 0
    if visible and wc.gpus_per_worker > visible:
        return [
            f"workers.gpus_per_worker: {wc.gpus_per_worker}, but this machine has {visible} "
            f"GPU{'s' * (visible > 1)}; lower it to {visible} or fewer"
        ]
    if wc.count and wc.address is None:
        cpus = os.cpu_count() or 1
        if wc.count * wc.cpus_per_worker > cpus:
            return [
                f"workers: {wc.count} workers x {wc.cpus_per_worker} CPUs exceed this "
                f"machine's {cpus} CPUs; lower workers.count or cpus_per_worker"
            ]
    return []


def _check_run_dir(run_dir: Path) -> list[str]:
    if run_dir.exists() and not run_dir.is_dir():
        return [f"{run_dir}: is a file; choose another --run-dir"]
    if run_dir.exists() and any(run_dir.iterdir()):
        return [f"{run_dir}: run directory is in use; resume it or choose another --run-dir"]
    parent = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        return [f"{run_dir}: {parent} is a file, not a directory; choose another --run-dir"]
    if not os.access(parent, os.W_OK):
        return [f"{run_dir}: {parent} is not writable; choose another --run-dir"]
    return []


def task_code(cfg: SearchConfig) -> list[str]:
    """The Python files the task folders will import (`!function` in a task YAML): a task folder
    is code, to be trusted as a script is."""
    import re

    notes = []
    for folder in cfg.include_paths():
        modules = set()
        for yml in sorted(Path(folder).rglob("*.yaml")) if Path(folder).is_dir() else []:
            for name in re.findall(r"!function\s+([\w.]+)\.\w+", yml.read_text(errors="replace")):
                modules.add(yml.parent / (name.replace(".", "/") + ".py"))
        if modules:
            files = ", ".join(str(m) for m in sorted(modules))
            notes.append(
                f"{folder}: its tasks import Python code ({files}); run only task "
                "folders you trust, as you would a script"
            )
    return notes
