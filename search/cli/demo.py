"""The README's main job: the demo search over the demo zoo, then held-out scores."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from evomerge.fitness.tasks import shipped_configs
from evomerge.search.config import SearchConfig
from evomerge.search.trial import TrialRecord

console = Console()
DEMO_CONFIG = shipped_configs() / "demo.yaml"


def heldout_summary(rows: list[dict]) -> str:
    """The demo's last line: the evolved best against the best parent, the best untuned merge
    and the joint reference, by held-out mean."""

    def best(kind: str) -> dict | None:
        return max((r for r in rows if r["kind"] == kind), key=lambda r: r["mean"], default=None)

    def named(row: dict | None) -> str:
        return "n/a" if row is None else f"{row['mean']:.3f} ({row['model']})"

    searched, parent, untuned = best("searched"), best("parent"), best("untuned")
    joint = best("reference")
    return (
        f"held-out mean: best {searched['mean'] if searched else float('nan'):.3f}, "
        f"best parent {named(parent)}, best untuned {named(untuned)}, "
        f"joint {joint['mean'] if joint else float('nan'):.3f}"
    )


def heldout_report(run, best: TrialRecord) -> tuple[str, str]:
    """The held-out table (parents, untuned merges, the evolved best, the joint reference when
    the zoo has one) and its summary line."""
    _, table, summary = heldout_scores(run, best)
    return table, summary


def heldout_scores(run, best: TrialRecord) -> tuple[list[dict], str, str]:
    """The held-out rows, their markdown table and the summary line."""
    from evomerge.fitness.tables import markdown_table
    from evomerge.fitness.zoo.skills import DISTRACTOR
    from evomerge.merge.recipe import Recipe
    from evomerge.search.outputs.export import heldout_rows
    from evomerge.search.spaces import space_for

    cfg = run.config
    zoo = cfg.zoo_dir()
    joint = zoo / "llama" / "joint" if zoo is not None else None
    references = {"joint reference": joint} if joint is not None and joint.is_dir() else {}
    searched = {"evomerge best": (Recipe.parse(best.recipe), best.fitness)}
    space = space_for(cfg)
    untuned = {}
    if DISTRACTOR in cfg.experts:
        # a user merging by hand would leave out the expert they know to be unrelated
        useful = [e for e in cfg.experts if e != DISTRACTOR]
        untuned = {f"{k}, without {DISTRACTOR}": r for k, r in space.baselines(useful).items()}
    rows = heldout_rows(run, searched, references, untuned)
    tasks = [s.name for s in cfg.heldout_specs()]
    for row in rows:
        row["mean"] = sum(row[t] for t in tasks) / len(tasks)
    columns = ["model", "kind", *tasks, "mean"]
    short = {t: t.removeprefix("zoo_").removesuffix("_heldout") for t in tasks}
    short_rows = [{short.get(k, k): r[k] for k in columns} for r in rows]
    return short_rows, markdown_table(short_rows), heldout_summary(rows)


def run_demo(out: Path, config: Path = DEMO_CONFIG, report_to: list[str] | None = None) -> None:
    from evomerge.search.cli.console import ensure_zoo, run_and_report
    from evomerge.search.run.rundir import RunDir

    cfg = SearchConfig.load(config)
    ensure_zoo(cfg)
    run = RunDir.reopen(out, cfg) if (out / "run.yaml").exists() else RunDir.create(out, cfg)

    def heldout(best, reporter) -> None:
        if best is None:
            return
        console.print("\nHeld-out split, never seen by the search:")
        rows, table, summary = heldout_scores(run, best)
        print(table)
        print(summary)
        if reporter is not None:  # the same tracker runs as the search's curves
            reporter.table("heldout", rows, table)

    run_and_report(run, report_to, after=heldout)
