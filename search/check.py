"""Refuse a search early: everything that could fail hours in, checked before any compute.

Every problem is reported, one line each, instead of the first only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from evomerge.merge.errors import EvomergeError
from evomerge.search.config import SearchConfig


def check_search(cfg: SearchConfig, run_dir: Path | None, resuming: bool = False) -> list[str]:
    problems: list[str] = []
    ckpts = {}
    from evomerge.merge.checkpoint import Checkpoint

    for alias in cfg.models:
        try:
            ckpts[alias] = Checkpoint(cfg.model_path(alias), label=f"models.{alias}")
        except EvomergeError as e:
            problems.append(str(e))
    num_layers = None
    if len(ckpts) == len(cfg.models):
        from evomerge.merge.engine import check_compatible

        try:
            check_compatible(ckpts, reference=cfg.base)
            num_layers = ckpts[cfg.base].info.num_layers
        except EvomergeError as e:
            problems.append(str(e))
    if num_layers is not None:
        problems += _check_genome(cfg, num_layers)
    problems += _check_tasks(cfg)
    problems += _check_workers(cfg)
    if run_dir is not None and not resuming:
        run_dir = Path(run_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            problems.append(
                f"{run_dir}: run directory is in use; resume it or choose another --run-dir"
            )
        parent = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path("."))
        if not os.access(parent, os.W_OK):
            problems.append(f"{run_dir}: {parent} is not writable; choose another --run-dir")
    return problems


def _check_genome(cfg: SearchConfig, num_layers: int) -> list[str]:
    from evomerge.search.genome import GenomeSpec

    try:
        genome = GenomeSpec(cfg, num_layers)
        genome.decode(genome.x0())
    except (ValueError, EvomergeError) as e:
        return [f"space: {e}"]
    popsize = cfg.cma.popsize or 4 + int(3 * math.log(genome.dim))
    if cfg.cma.budget < popsize:
        return [
            f"cma.budget: {cfg.cma.budget} evaluations is less than one generation "
            f"(popsize {popsize}, genome of {genome.dim} genes); raise the budget"
        ]
    if genome.dim > cfg.cma.diagonal_above and cfg.cma.budget < 10 * popsize:
        return [
            f"cma.budget: {cfg.cma.budget} evaluations for {genome.dim} genes is under 10 "
            "generations; expect little progress (raise the budget or coarsen the genome)"
        ]
    return []


def _check_tasks(cfg: SearchConfig) -> list[str]:
    from evomerge.fitness.scorer import Scorer

    specs = list(cfg.fitness.tasks) + list(cfg.fitness.heldout_tasks or [])
    for path in cfg.include_paths():
        if not path.is_dir():
            return [f"fitness.include: {path} is not a directory of task YAMLs"]
    try:
        Scorer(specs, include_paths=cfg.include_paths(), limit=cfg.fitness.limit)
    except EvomergeError as e:
        return [f"fitness.tasks: {e}"]
    except Exception as e:  # noqa: BLE001 - a task that fails to load offline, named for the user
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [f"fitness.tasks: cannot load offline: {first}"]
    return []


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
