"""`evomerge export`: the winning recipe as a recipe, a mergekit config where mergekit can express
it, a model with its card, and a held-out comparison with the parents and the merges a user
would try by hand."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml

from evomerge.fitness.tables import markdown_table
from evomerge.merge.engine import merge_to_dir
from evomerge.merge.errors import EvomergeError
from evomerge.merge.io.files import guard_output, staged_dir, write_atomic
from evomerge.merge.recipe import Recipe
from evomerge.search.run.rundir import RunDir
from evomerge.search.spaces import space_for
from evomerge.search.spaces.space import SearchSpace
from evomerge.search.trial import Status, TrialRecord

EXPORT_MARKER = "export"


def pick_trials(run: RunDir, trial: str | None, top_k: int) -> list[TrialRecord]:
    """The chosen trial (`G:I`), or the top-k COMPLETE trials (`RunDir.ranked`: the winner of the
    final rescoring first). Only the chosen trials' recipes are built."""
    trials = run.journal().trials
    if trial:
        try:
            g, i = (int(p) for p in trial.split(":"))
        except ValueError:
            raise EvomergeError(f"--trial {trial!r}: use GENERATION:INDEX, e.g. 12:3") from None
        if (g, i) not in trials or trials[g, i].status is not Status.COMPLETE:
            raise EvomergeError(f"--trial {trial}: no COMPLETE trial with that id in {run.path}")
        return [run.full(trials[g, i])]
    done = run.ranked(trials)
    if not done:
        raise EvomergeError(f"{run.path}: no COMPLETE trial to export yet")
    return [run.full(t) for t in done[: max(1, top_k)]]


def heldout_rows(
    run: RunDir,
    searched: dict[str, tuple[Recipe, float | None]],
    references: dict | None = None,
    untuned: dict[str, Recipe] | None = None,
) -> list[dict]:
    """The held-out table: the searched recipes (label -> recipe, search fitness), the parents,
    the untuned merges of the search space (and any further `untuned` ones), and any
    `references` (label -> model directory). Columns: model, kind, search fitness, held-out
    objective, then each task's metric."""
    from evomerge.fitness.models import load_model, model_from_recipe
    from evomerge.fitness.scorer import Scorer

    cfg = run.config
    scorer = Scorer(
        cfg.heldout_specs(),
        include_paths=cfg.include_paths(),
        num_fewshot=cfg.fitness.num_fewshot,
        batch_size=cfg.fitness.batch_size,
        apply_chat_template=cfg.fitness.apply_chat_template,
        part="heldout",
    )
    space = space_for(cfg)
    sources: list[tuple[str, str, Recipe | Path, float | None]] = [
        (label, "searched", recipe, fitness) for label, (recipe, fitness) in searched.items()
    ]
    sources += [(a, "parent", cfg.model_path(a), None) for a in cfg.models]
    untuned = {**space.baselines(), **(untuned or {})}
    sources += [(label, "untuned", r, None) for label, r in untuned.items()]
    sources += [(label, "reference", Path(p), None) for label, p in (references or {}).items()]
    rows = []
    for label, kind, source, search_fitness in sources:
        if isinstance(source, Recipe):
            model, tok = model_from_recipe(source)
        else:
            model, tok = load_model(source)
        result = scorer.bind(model, tok).score()
        if not result.ok:
            raise EvomergeError(f"held-out scoring of {label} failed: {result.error}")
        row = {
            "model": label,
            "kind": kind,
            "search fitness": search_fitness,
            "heldout objective": result.fitness,
        }
        row |= {k.split("/")[0]: v for k, v in result.metrics.items()}
        rows.append(row)
    return rows


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def model_card(
    space: SearchSpace,
    recipe: Recipe,
    trial: TrialRecord,
    rows: list[dict],
    run: RunDir,
    mergekit: bool,
) -> str:
    sources = "\n".join(f"- `{a}`: {m.pinned(a)}" for a, m in recipe.models.items())
    rebuild = "evomerge merge recipe.yaml OUT"
    if mergekit:
        rebuild += "        # or: mergekit-yaml mergekit.yaml OUT (deterministic methods)"
    return f"""---
tags: [merge, evomerge]
---
# Merged with evomerge

Found by an evolutionary search (CMA-ES) in `{run.path}` (trial
{trial.generation}:{trial.index}, search fitness {trial.fitness:.4f}).

## Sources
{sources}

## Genome
{space.card(recipe)}
## Scores (held-out split, never seen by the search)
{markdown_table(rows) if rows else "(not scored)"}

## Rebuild
```bash
{rebuild}
```
"""


def export(
    run_dir: Path | RunDir,
    out: Path,
    trial: str | None = None,
    top_k: int = 1,
    max_shard_size: str = "5GB",
    force: bool = False,
) -> Path:
    run = run_dir if isinstance(run_dir, RunDir) else RunDir.reopen(run_dir)
    guard_output(out, [run.path, *run.config.model_paths().values()], EXPORT_MARKER, force)
    chosen = pick_trials(run, trial, top_k)
    recipe = Recipe.parse(chosen[0].recipe)
    space = space_for(run.config)
    searched = {
        f"trial {t.generation}:{t.index}": (Recipe.parse(t.recipe), t.fitness) for t in chosen
    }
    rows = heldout_rows(run, searched)
    mergekit = space.mergekit(recipe)
    with staged_dir(out, replace=force) as tmp:
        recipe.save(tmp / "recipe.yaml")
        if mergekit is not None:
            header = "# mergekit config of the evomerge recipe (exact for deterministic methods)\n"
            write_atomic(tmp / "mergekit.yaml", header + yaml.safe_dump(mergekit, sort_keys=False))
        merge_to_dir(recipe, tmp / "model", max_shard_size=max_shard_size)
        write_atomic(tmp / "heldout.csv", table_csv(rows))
        write_atomic(tmp / "heldout.md", markdown_table(rows) + "\n")
        card = model_card(space, recipe, chosen[0], rows, run, mergekit is not None)
        write_atomic(tmp / "model" / "README.md", card)
        summary = [
            {k: t.get(k) for k in ("generation", "index", "fitness", "metrics")} for t in chosen
        ]
        write_atomic(tmp / "trials.json", json.dumps(summary, indent=2) + "\n")
        write_atomic(tmp / ".evomerge", json.dumps({"written_by": EXPORT_MARKER}) + "\n")
    from evomerge.search.watch.trackers import log_table

    log_table(run, "heldout", rows, markdown_table(rows))  # the search's tracker runs, if any
    return out
