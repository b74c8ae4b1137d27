"""The README's main job: the demo search over the demo zoo, then held-out scores."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from evomerge.fitness.tasks import shipped_configs
from evomerge.search.config import SearchConfig

console = Console()
DEMO_CONFIG = shipped_configs() / "demo.yaml"


def heldout_report(cfg: SearchConfig, best_recipe: Path) -> str:
    """The best recipe's held-out scores beside each parent's and an untuned merge's."""
    from evomerge.fitness.tasks import to_split
    from evomerge.fitness.zoo.table import markdown, score_rows, untuned_recipe
    from evomerge.merge.recipe import Recipe

    zoo = cfg.zoo_dir()
    assert zoo is not None
    tasks = [t.name for t in (cfg.fitness.heldout_tasks or to_split(cfg.fitness.tasks, "heldout"))]
    rows: dict[str, object] = dict(cfg.model_paths())
    if cfg.dfs is None:
        rows[f"untuned {cfg.space.method} (weight 1, density 1, all experts)"] = untuned_recipe(
            zoo, cfg.space.method, cfg.experts, 1.0
        )
    elif cfg.dfs.ps_recipe:
        rows["PS stage (dfs.ps_recipe)"] = cfg.ps_recipe()
    rows["evomerge best"] = Recipe.load(best_recipe)
    table = score_rows(zoo, rows, tasks)
    for row in table.values():
        row["mean"] = sum(row[t] for t in tasks) / len(tasks)
    return markdown(table, [*tasks, "mean"])


def run_demo(out: Path, config: Path = DEMO_CONFIG) -> None:
    from evomerge.search.console import ensure_zoo, run_and_report
    from evomerge.search.rundir import RunDir

    cfg = SearchConfig.load(config)
    ensure_zoo(cfg)
    run = RunDir.reopen(out, cfg) if (out / "run.yaml").exists() else RunDir.create(out, cfg)
    best = run_and_report(run)
    if best is None:
        return
    console.print("\nHeld-out split (exact match), never seen by the search:")
    print(heldout_report(cfg, run.path / "best" / "recipe.yaml"))
