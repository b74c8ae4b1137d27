"""`evomerge export`: the winning recipe as a recipe, a mergekit config, a model with its card,
and a held-out comparison with the parents and the merges a user would try by hand."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml

from evomerge.merge.architecture import ModelInfo
from evomerge.merge.checkpoint import Checkpoint, staged_dir
from evomerge.merge.engine import merge_to_dir
from evomerge.merge.errors import EvomergeError
from evomerge.merge.recipe import Recipe, write_atomic
from evomerge.search.mergekit_yaml import to_mergekit
from evomerge.search.rundir import COMPLETE, RunDir


def pick_trials(run: RunDir, trial: str | None, top_k: int) -> list[dict]:
    """The chosen trial (`G:I`), or the top-k COMPLETE trials by search fitness."""
    trials = run.trials()
    if trial:
        try:
            key = tuple(int(p) for p in trial.split(":"))
        except ValueError:
            raise EvomergeError(f"--trial {trial!r}: use GENERATION:INDEX, e.g. 12:3") from None
        if key not in trials or trials[key]["status"] != COMPLETE:
            raise EvomergeError(f"--trial {trial}: no COMPLETE trial with that id in {run.path}")
        return [trials[key]]
    done = sorted(
        (t for t in trials.values() if t["status"] == COMPLETE),
        key=lambda t: (-t["fitness"], t["generation"], t["index"]),
    )
    if not done:
        raise EvomergeError(f"{run.path}: no COMPLETE trial to export yet")
    return done[: max(1, top_k)]


def baselines(run: RunDir) -> dict[str, Recipe]:
    """Untuned merges: uniform linear, task arithmetic at several lambdas, TIES, DARE-TIES."""
    cfg = run.config
    models = {a: str(p) for a, p in cfg.model_paths().items()}
    layers = ModelInfo.from_dir(cfg.model_path(cfg.base)).num_layers
    experts = cfg.experts
    dtype = cfg.space.dtype

    def one(method: str, params: dict, **ps) -> Recipe:
        return Recipe.single_group(models, cfg.base, method, layers, params, dtype=dtype, **ps)

    out = {"linear (uniform)": one("linear", {a: {"weight": 1.0} for a in models})}
    for lam in (0.3, 0.5, 0.7, 1.0):
        out[f"task arithmetic (lambda {lam})"] = one(
            "task_arithmetic", {e: {"weight": 1.0} for e in experts}, **{"lambda": lam}
        )
    out["ties (density 0.5)"] = one("ties", {e: {"weight": 1.0, "density": 0.5} for e in experts})
    out["dare_ties (density 0.5)"] = one(
        "dare_ties", {e: {"weight": 1.0, "density": 0.5} for e in experts}, seed=0
    )
    return out


def heldout_table(run: RunDir, chosen: list[dict]) -> list[dict]:
    """Rows: label, kind, search fitness (where known), held-out metrics and their objective."""
    from evomerge.fitness.models import load_model, model_from_recipe
    from evomerge.fitness.scorer import Scorer
    from evomerge.fitness.tasks import to_split

    cfg = run.config
    specs = cfg.fitness.heldout_tasks or to_split(cfg.fitness.tasks, "heldout")
    scorer = Scorer(
        specs,
        include_paths=cfg.include_paths(),
        num_fewshot=cfg.fitness.num_fewshot,
        batch_size=cfg.fitness.batch_size,
    )
    sources: list[tuple[str, str, object, float | None]] = []
    for t in chosen:
        sources.append(
            (
                f"trial {t['generation']}:{t['index']}",
                "searched",
                Recipe.parse(t["recipe"]),
                t["fitness"],
            )
        )
    sources += [(a, "parent", cfg.model_path(a), None) for a in cfg.models]
    sources += [(label, "untuned", r, None) for label, r in baselines(run).items()]
    rows = []
    for label, kind, source, search_fitness in sources:
        if isinstance(source, Recipe):
            model, tok = model_from_recipe(source)
        else:
            model, tok = load_model(Path(str(source)))
        result = scorer.bind(model, tok).score()
        row = {
            "model": label,
            "kind": kind,
            "search fitness": search_fitness,
            "heldout objective": result.fitness if result.ok else None,
        }
        row |= {k.split("/")[0]: v for k, v in result.metrics.items()}
        rows.append(row)
    return rows


def table_markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
            for v in r.values()
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def model_card(recipe: Recipe, trial: dict, rows: list[dict], run: RunDir) -> str:
    ps = recipe.parameter_space
    assert ps is not None
    sources = "\n".join(f"- `{a}`: {m.path}" for a, m in recipe.models.items())
    genome = "\n".join(
        f"| {g.label()} | "
        + ", ".join(
            f"{a}: " + ", ".join(f"{k} {v:.3f}" for k, v in p.model_dump().items())
            for a, p in g.params.items()
        )
        + " |"
        for g in ps.groups
    )
    return f"""---
tags: [merge, evomerge]
---
# Merged with evomerge

Method **{ps.method}** over base `{ps.base}`, found by an evolutionary search (CMA-ES) in
`{run.path}` (trial {trial["generation"]}:{trial["index"]}, search fitness {trial["fitness"]:.4f}).

## Sources
{sources}

## Genome (per layer group)
| group | parameters |
|---|---|
{genome}

## Scores (held-out split, never seen by the search)
{table_markdown(rows)}

## Rebuild
```bash
evomerge merge recipe.yaml OUT        # or: mergekit-yaml mergekit.yaml OUT (deterministic methods)
```
"""


def export(
    run_dir: Path,
    out: Path,
    trial: str | None = None,
    top_k: int = 1,
    max_shard_size: str = "5GB",
    force: bool = False,
    score: bool = True,
) -> Path:
    run = RunDir.reopen(run_dir)
    chosen = pick_trials(run, trial, top_k)
    recipe = Recipe.parse(chosen[0]["recipe"])
    if out.exists() and not force:
        raise EvomergeError(f"{out}: output directory exists; pass --force to replace it")
    rows = heldout_table(run, chosen) if score else []
    base = Checkpoint(run.config.model_path(run.config.base))
    with staged_dir(out, force) as tmp:
        recipe.save(tmp / "recipe.yaml")
        mk = to_mergekit(recipe, base.names, base.info.num_layers)
        header = "# mergekit config of the evomerge recipe (exact for deterministic methods)\n"
        write_atomic(tmp / "mergekit.yaml", header + yaml.safe_dump(mk, sort_keys=False))
        merge_to_dir(recipe, tmp / "model", max_shard_size=max_shard_size)
        if rows:
            write_atomic(tmp / "heldout.csv", table_csv(rows))
            write_atomic(tmp / "heldout.md", table_markdown(rows) + "\n")
        (tmp / "model" / "README.md").write_text(model_card(recipe, chosen[0], rows, run))
        write_atomic(
            tmp / "trials.json",
            json.dumps(
                [
                    {k: t.get(k) for k in ("generation", "index", "fitness", "metrics")}
                    for t in chosen
                ],
                indent=2,
            )
            + "\n",
        )
    return out
