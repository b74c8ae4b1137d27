"""The zoo's specialisation table: every model and the untuned merges on the held-out split.

Columns: each skill in the format its tasks score (the experts' formats and the composite), then
the base's pretraining skills in their pretraining format (`*_pre`): what each model kept."""

from __future__ import annotations

from pathlib import Path

from evomerge.fitness.scorer import Scorer
from evomerge.fitness.tasks import TaskSpec, zoo_task_name
from evomerge.fitness.zoo import skills as sk
from evomerge.fitness.zoo.build import EXPERTS
from evomerge.merge.recipe import Recipe

COLUMNS = [zoo_task_name(s, "gen", "heldout") for s in sk.SKILLS] + [
    zoo_task_name(s, "pre", "heldout") for s in sk.KEPT
]
POOL = ["add", "caps", "script"]  # the experts a user would merge by hand


def untuned_recipe(zoo: Path, method: str, experts: list[str], weight: float, **ps) -> Recipe:
    """A one-group recipe over the zoo's Llama family, as a user would try by hand."""
    models = {a: str(zoo / "llama" / a) for a in ["base", *experts]}
    params = {e: {"weight": weight} for e in experts}
    return Recipe.single_group(models, "base", method, _layers(zoo), params, **ps)


def _layers(zoo: Path) -> int:
    import json

    return int(
        json.loads((zoo / "llama" / "base" / "config.json").read_text())["num_hidden_layers"]
    )


def score_rows(
    zoo: Path, rows: dict[str, object], tasks: list[str] | None = None
) -> dict[str, dict]:
    """rows: label -> model directory or Recipe. Returns label -> {task: value}."""
    from evomerge.fitness.models import load_model, model_from_recipe

    specs = [TaskSpec(name=t) for t in tasks or COLUMNS]
    scorer = Scorer(specs, include_paths=[zoo / "tasks"])
    table = {}
    for label, source in rows.items():
        if isinstance(source, Recipe):
            model, tok = model_from_recipe(source)
        else:
            model, tok = load_model(Path(str(source)))
        result = scorer.bind(model, tok).score()
        if not result.ok:
            raise RuntimeError(f"scoring {label} failed: {result.error}")
        table[label] = {k.split("/")[0]: v for k, v in result.metrics.items()}
    return table


def specialisation_rows(zoo: Path) -> dict[str, object]:
    llama = zoo / "llama"
    rows: dict[str, object] = {name: llama / name for name in ("base", *EXPERTS, "joint")}
    pool = ", ".join(POOL)
    rows[f"linear uniform ({pool})"] = untuned_recipe(zoo, "linear", POOL, 1 / len(POOL))
    rows[f"task arithmetic 1.0 ({pool})"] = untuned_recipe(zoo, "task_arithmetic", POOL, 1.0)
    rows[f"task arithmetic 1.0 ({pool}, next)"] = untuned_recipe(
        zoo, "task_arithmetic", [*POOL, sk.DISTRACTOR], 1.0
    )
    return rows


def markdown(table: dict[str, dict], columns: list[str] | None = None) -> str:
    """label -> {task: value} as a markdown table with short column names."""
    from evomerge.fitness.tables import markdown_table

    cols = columns or COLUMNS
    short = {c: c.removeprefix("zoo_").removesuffix("_heldout") for c in cols}
    return markdown_table(
        [{"model": label, **{short[c]: row.get(c) for c in cols}} for label, row in table.items()]
    )
