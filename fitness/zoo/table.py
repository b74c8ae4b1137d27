"""The zoo's specialisation table: every model and the untuned merges on the held-out split."""

from __future__ import annotations

from pathlib import Path

from evomerge.fitness.scorer import Scorer
from evomerge.fitness.tasks import TaskSpec, zoo_task_name
from evomerge.fitness.zoo import skills as sk
from evomerge.merge.recipe import Recipe

COLUMNS = [zoo_task_name(s, "gen", "heldout") for s in sk.SKILLS]


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
    rows: dict[str, object] = {
        name: llama / name for name in ("base", "add", "caps", "next", "joint")
    }
    rows["linear 50/50 (add, caps)"] = untuned_recipe(zoo, "linear", ["add", "caps"], 0.5)
    rows["task arithmetic 1.0 (add, caps)"] = untuned_recipe(
        zoo, "task_arithmetic", ["add", "caps"], 1.0
    )
    rows["task arithmetic 1.0 (add, caps, next)"] = untuned_recipe(
        zoo, "task_arithmetic", ["add", "caps", "next"], 1.0
    )
    return rows


def markdown(table: dict[str, dict], columns: list[str] | None = None) -> str:
    cols = columns or COLUMNS
    short = [c.removeprefix("zoo_").removesuffix("_heldout") for c in cols]
    lines = ["| model | " + " | ".join(short) + " |", "|---|" + "---:|" * len(cols)]
    for label, row in table.items():
        lines.append(
            f"| {label} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in cols) + " |"
        )
    return "\n".join(lines)
