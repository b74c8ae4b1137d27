"""Refuse a search early: everything that could fail hours in, checked before any compute.

Every problem is reported, one line each, instead of the first only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from evomerge.merge.errors import EvomergeError
from evomerge.search.config import SearchConfig


def check_search(cfg: SearchConfig, run_dir: Path | None) -> list[str]:
    from evomerge.fitness.models import check_loadable
    from evomerge.merge.checkpoint import Checkpoint
    from evomerge.merge.engine import check_compatible

    problems: list[str] = []
    ckpts = {}
    for alias in cfg.models:
        try:
            check_loadable(cfg.model_path(alias), label=f"models.{alias}")
            ckpts[alias] = Checkpoint(cfg.model_path(alias), label=f"models.{alias}")
        except EvomergeError as e:
            problems.append(str(e))
    if len(ckpts) == len(cfg.models):
        try:
            check_compatible(ckpts, reference=cfg.base)
        except EvomergeError as e:
            problems.append(str(e))
        else:
            problems += _check_space(cfg)
    problems += _check_tasks(cfg)
    problems += _check_workers(cfg)
    if run_dir is not None:
        problems += _check_run_dir(Path(run_dir))
    return problems


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


def _check_tasks(cfg: SearchConfig) -> list[str]:
    """Every task loads (its dataset downloaded here, on the driver, or found in the cache when
    offline); each one that does not is named."""
    from evomerge.fitness.scorer import Scorer

    problems = [
        f"fitness.include: {path} is not a directory of task YAMLs"
        for path in cfg.include_paths()
        if not path.is_dir()
    ]
    if problems:
        return problems
    fc = cfg.fitness
    sets = [(fc.tasks, "search"), (cfg.heldout_specs(), "heldout")]

    def load(specs, part) -> None:
        Scorer(specs, include_paths=cfg.include_paths(), limit=fc.limit, part=part)

    for specs, part in sets:
        try:
            load(specs, part)
        except EvomergeError as e:
            return [f"fitness.tasks: {line}" for line in str(e).splitlines()]
        except Exception:  # noqa: BLE001 - a task that fails to load: find which, name each
            for spec in specs:
                try:
                    load([spec], part)
                except Exception as e:  # noqa: BLE001
                    first = str(e).splitlines()[0] if str(e) else type(e).__name__
                    problems.append(f"fitness.tasks: {spec.name}: cannot load: {first}")
    return list(dict.fromkeys(problems))


def _check_workers(cfg: SearchConfig) -> list[str]:
    import torch

    wc = cfg.workers
    if wc.device == "cuda" and wc.address is None and not torch.cuda.is_available():
        return ["workers.device: cuda, but this machine has no CUDA device; use auto or cpu"]
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
