"""`evomerge report`: a search's story from its journal (also while it runs).

Writes into `<run>/report/`: summary tables, `fitness.png` (best and mean fitness against
evaluations with the spread of each generation), `genome.png` (the best genome's per-group
parameters per model), and `index.html` tying them together.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from evomerge.merge.errors import EvomergeError
from evomerge.merge.files import staged_dir, write_atomic
from evomerge.merge.recipe import Recipe
from evomerge.search.plots import pyplot, save
from evomerge.search.rundir import RunDir
from evomerge.search.spaces import space_for
from evomerge.search.trial import Status


def trials_frame(run: RunDir) -> pd.DataFrame:
    rows = [
        {
            "generation": g,
            "index": i,
            **{
                k: t.get(k)
                for k in (
                    "status",
                    "fitness",
                    "merge_seconds",
                    "eval_seconds",
                    "worker",
                    "error",
                    "time",
                )
            },
        }
        for (g, i), t in sorted(run.trials().items())
    ]
    return pd.DataFrame(rows)


def summarize(run: RunDir, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    by_status = df.groupby("status").size().rename("trials").to_frame()
    done = df[df.status == Status.COMPLETE]
    per_gen = done.groupby("generation")["fitness"].agg(["max", "mean", "min", "count"])
    per_gen["best so far"] = per_gen["max"].cummax()
    records = run.records()
    times = [r["time"] for r in records if "time" in r]
    wall = (max(times) - min(times)) if len(times) > 1 else 0.0
    merge = float(df["merge_seconds"].fillna(0).sum())
    evaluate = float(df["eval_seconds"].fillna(0).sum())
    split = pd.DataFrame(
        {"seconds": [merge, evaluate, wall]},
        index=["materialize (all workers)", "evaluate (all workers)", "wall clock"],
    )
    return {
        "trials by status": by_status,
        "fitness per generation": per_gen.round(4),
        "time": split.round(2),
    }


def plot_fitness(df: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    done = df[df.status == Status.COMPLETE].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(done):
        evals = df.reset_index(drop=True).index + 1
        order = df.reset_index(drop=True)
        ax.scatter(
            evals[order.status == Status.COMPLETE], done["fitness"], s=8, alpha=0.4, label="trial"
        )
        gen = done.groupby("generation")["fitness"]
        ends = order.groupby("generation").apply(lambda g: g.index.max() + 1, include_groups=False)
        x = ends.loc[gen.mean().index]
        ax.plot(x, gen.mean(), label="generation mean")
        ax.fill_between(x, gen.min(), gen.max(), alpha=0.2, label="generation spread")
        ax.plot(x, gen.max().cummax(), label="best so far", linewidth=2)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("fitness")
    ax.legend(loc="lower right")
    save(fig, path)


def write_report(run_dir: Path) -> Path:
    """Write RUN/report/ whole (staged, then renamed into place: never half-written)."""
    run = RunDir.reopen(run_dir)
    df = trials_frame(run)
    if df.empty:
        raise EvomergeError(f"{run.path}: no trials journaled yet; report once the search has run")
    with staged_dir(run.path / "report", replace=True) as out:
        _write(run, df, out)
    return run.path / "report"


def _write(run: RunDir, df: pd.DataFrame, out: Path) -> None:
    tables = summarize(run, df)
    plot_fitness(df, out / "fitness.png")
    images = ["fitness.png"]
    best = run.path / "best" / "recipe.yaml"
    if best.exists():
        images += space_for(run.config).plots(Recipe.load(best), out)
    parts = [
        f"<h1>evomerge report: {html.escape(run.config.name)}</h1>",
        f"<p>{html.escape(str(run.path))}: {len(df)} trials journaled.</p>",
    ]
    for title, table in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>{table.to_html()}")
        write_atomic(out / f"{title.replace(' ', '_')}.csv", table.to_csv())
    parts += [f'<h2>{name[:-4]}</h2><img src="{name}">' for name in images]
    failed = df[df.status == Status.FAILED][["generation", "index", "error"]]
    if len(failed):
        parts.append(f"<h2>failed trials</h2>{failed.to_html(index=False)}")
    write_atomic(out / "index.html", "<html><body>" + "\n".join(parts) + "</body></html>\n")
