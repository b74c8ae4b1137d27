"""`evomerge report`: a search's story from its journal (also while it runs).

Writes into `<run>/report/`: summary tables, `fitness.png` (best and mean fitness against
evaluations with the spread of each generation), `genome.png` (the best genome's per-group
parameters per model), and `index.html` tying them together.
"""

from __future__ import annotations

import contextlib
import html
import time
from pathlib import Path

import pandas as pd

from evomerge.merge.errors import EvomergeError
from evomerge.merge.io.files import staged_dir, write_atomic
from evomerge.merge.recipe import Recipe
from evomerge.search.plots import pyplot, save
from evomerge.search.run.rundir import RunDir, is_run_dir
from evomerge.search.spaces import space_for
from evomerge.search.trial import Status, TrialRecord

_FIELDS = ("fitness", "merge_seconds", "eval_seconds", "worker", "error", "time")
_ITEMS = ("items scored", "items full", "decision")


def trials_frame(run: RunDir) -> pd.DataFrame:
    """One row per trial, from the journal as journaled (no recipe is built)."""
    trials = sorted(run.journal().trials.items())
    if not trials:
        return pd.DataFrame([])
    # built a column at a time: pandas infers each column's dtype as from a list of row dicts
    # (every row has every key), at a fifth of the cost on a 10,000-trial journal
    names = ("generation", "index", "status", *_FIELDS, *_ITEMS)
    columns: dict[str, list] = {k: [] for k in names}
    generation, index, status = columns["generation"], columns["index"], columns["status"]
    fields = [(columns[k], k) for k in _FIELDS]
    scored, full_, decision = (columns[k] for k in _ITEMS)
    for (g, i), t in trials:
        generation.append(g)
        index.append(i)
        status.append(None if t.status is None else t.status.value)  # a plain str column
        for column, k in fields:
            column.append(t.get(k))  # a field the trial's lines lack is a missing value
        items = _items(t)
        scored.append(items["items scored"])
        full_.append(items["items full"])
        decision.append(items["decision"])
    return pd.DataFrame(columns)


def _items(t: TrialRecord) -> dict:
    """A trial's search items: scored (racing: every chunk a worker scored, those lost to a
    stop included) and what full evaluation scores; its racing decision, if it raced."""
    race = t.race
    if race is None:
        n = t.examples if t.status is Status.COMPLETE else None
        return {"items scored": n, "items full": n, "decision": None}
    return {"items scored": race["scored"], "items full": race["of"], "decision": race["decision"]}


def racing_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Per generation of a racing search: items scored against items full evaluation would
    have scored, and how its candidates were decided (empty without racing)."""
    raced = df[df.decision.notna()] if "decision" in df else df.iloc[:0]
    if not len(raced):
        return pd.DataFrame()
    per_gen = raced.groupby("generation").agg(
        scored=("items scored", "sum"), full=("items full", "sum")
    )
    per_gen["ratio"] = (per_gen["scored"] / per_gen["full"]).round(3)
    decisions = raced.groupby(["generation", "decision"]).size().unstack(fill_value=0)
    per_gen = per_gen.join(decisions).fillna(0)
    total = per_gen.drop(columns="ratio").sum()
    per_gen.loc["all"] = {**total, "ratio": round(total["scored"] / total["full"], 3)}
    counts = [c for c in per_gen if c != "ratio"]
    per_gen[counts] = per_gen[counts].astype(int)
    return per_gen.rename(columns={"scored": "items scored", "full": "items full evaluation"})


def summarize(run: RunDir, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    by_status = df.groupby("status").size().rename("trials").to_frame()
    done = df[df.status == Status.COMPLETE]
    per_gen = done.groupby("generation")["fitness"].agg(["max", "mean", "min", "count"])
    per_gen["best so far"] = per_gen["max"].cummax()
    times = [r.time for r in run.journal(update=False).records if r.time is not None]
    wall = (max(times) - min(times)) if len(times) > 1 else 0.0
    merge = float(df["merge_seconds"].fillna(0).sum())
    evaluate = float(df["eval_seconds"].fillna(0).sum())
    split = pd.DataFrame(
        {"seconds": [merge, evaluate, wall]},
        index=["materialize (all workers)", "evaluate (all workers)", "wall clock"],
    )
    tables = {
        "trials by status": by_status,
        "fitness per generation": per_gen.round(4),
        "time": split.round(2),
    }
    racing = racing_frame(df)
    if len(racing):
        tables["racing: items per generation"] = racing
    return tables


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


def best_and_parents(run: RunDir) -> pd.DataFrame:
    """The best trial beside the parents, on the search split (the line the search must
    clear), with the rescored fitness where the winner was scored again at the end."""
    rows = []
    ranked = run.ranked(run.journal(update=False).trials)
    if ranked:
        best = ranked[0]
        rows.append(
            {
                "model": f"evomerge best (trial {best.generation}:{best.index})",
                "search fitness": best.fitness,
                "rescored fitness": (best.rescored or {}).get("fitness"),
            }
        )
    for label, p in sorted(
        run.parents().items(), key=lambda kv: -(kv[1].get("fitness") or float("-inf"))
    ):
        rows.append(
            {
                "model": f"parent {label}",
                "search fitness": p.get("fitness"),
                "rescored fitness": None,
            }
        )
    frame = pd.DataFrame(rows, columns=["model", "search fitness", "rescored fitness"])
    if frame["rescored fitness"].isna().all():
        frame = frame.drop(columns="rescored fitness")
    return frame.set_index("model").round(4)


def rescored_frame(run: RunDir) -> pd.DataFrame:
    """Trials scored again on more search items at the end, best rescore first."""
    rows = [
        {
            "trial": f"{t.generation}:{t.index}",
            "search fitness": t.fitness,
            "rescored fitness": t.rescored.get("fitness"),
            "rescore examples": t.rescored.get("examples"),
            "error": t.rescored.get("error"),
        }
        for t in run.journal(update=False).trials.values()
        if isinstance(t.rescored, dict)
    ]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).sort_values("rescored fitness", ascending=False, na_position="last")
    if frame["error"].isna().all():
        frame = frame.drop(columns="error")
    return frame.set_index("trial").round(4)


def write_report(
    run_dir: Path | RunDir, refresh: float | None = None, df: pd.DataFrame | None = None
) -> Path:
    """Write RUN/report/ whole (staged, then renamed into place: never half-written). While
    the run is live and `refresh` is given, the page reloads itself every `refresh` seconds.
    Given a RunDir, its journal is followed (parsed once, then only what was appended); `df`:
    its `trials_frame`, when the caller has built it already (`evomerge report` prints its
    tables too)."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir.reopen(run_dir)
    df = trials_frame(run) if df is None else df
    if df.empty:
        raise EvomergeError(f"{run.path}: no trials journaled yet; report once the search has run")
    with staged_dir(run.path / "report", replace=True) as out:
        _write(run, df, out, refresh)
    return run.path / "report"


def watch_report(run_dir: Path | RunDir, every: float, log=print, sleep=time.sleep) -> Path:
    """Rewrite the report every `every` seconds while the run is live (the page reloads
    itself); once it is not, write it a last time, without the reload, and return. The run
    directory is opened once and its journal followed: each round parses only the lines
    appended since the last."""
    from evomerge.search.watch.status import row, run_status

    run = run_dir if isinstance(run_dir, RunDir) else None
    where = run_dir.path if isinstance(run_dir, RunDir) else Path(run_dir)
    said = None
    while True:
        if run is None and is_run_dir(where):
            with contextlib.suppress(EvomergeError):  # not readable yet: the status says why
                run = RunDir.reopen(where)
        status = run_status(run if run is not None else where)
        has_trials = status.done > 0 or (where / "trials.jsonl").is_file()
        if run is not None and has_trials and status.state != "not a run":
            try:
                out = write_report(run, refresh=every)
            except EvomergeError:
                out = None  # no trial journaled yet: wait for the first
        else:
            out = None
        cells = row(status)
        line = (
            f"{cells['state']}  evals {cells['evals']}  best {cells['best']}  "
            f"elapsed {cells['elapsed']}  ETA {cells['ETA']}"
        )
        if line != said:
            log(line)
            said = line
        if not status.live:
            if out is None:
                raise EvomergeError(
                    f"{where}: {status.state}, no trial journaled; nothing to report"
                )
            return out
        sleep(every)


def _write(run: RunDir, df: pd.DataFrame, out: Path, refresh: float | None = None) -> None:
    from evomerge.search.watch.status import row, run_status

    now = run_status(run)
    status = row(now)
    refresh = refresh if now.live else None  # a finished page stays still
    tables = summarize(run, df)
    tables = {"best and parents (search split)": best_and_parents(run), **tables}
    rescored = rescored_frame(run)
    if len(rescored):
        tables["rescored at the end (more search items)"] = rescored
    plot_fitness(df, out / "fitness.png")
    images = ["fitness.png"]
    best = run.path / "best" / "recipe.yaml"
    if best.exists():
        images += space_for(run.config).plots(Recipe.load(best), out)
    written = time.strftime("%Y-%m-%d %H:%M:%S")
    state = (
        f"{status['state']}; evaluations {status['evals']}; best {status['best']}; "
        f"elapsed {status['elapsed']}; ETA {status['ETA']}"
    )
    parts = [
        f"<h1>evomerge report: {html.escape(run.config.name)}</h1>",
        f"<p>{html.escape(str(run.path))}: {len(df)} trials journaled.</p>",
        f'<p id="state">{html.escape(state)} (written {written}'
        + (f", reloads every {refresh:g} s" if refresh else "")
        + ")</p>",
    ]
    for title, table in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>{table.to_html(na_rep='')}")
        write_atomic(out / f"{title.replace(' ', '_')}.csv", table.to_csv())
    parts += [f'<h2>{name[:-4]}</h2><img src="{name}" alt="{name[:-4]}">' for name in images]
    failed = df[df.status == Status.FAILED][["generation", "index", "error"]]
    if len(failed):
        parts.append(f"<h2>failed trials</h2>{failed.to_html(index=False)}")
    # a live run's page reloads itself (a browser left open follows the search); a finished
    # run's page stays still
    reload = f'<meta http-equiv="refresh" content="{refresh:g}">' if refresh else ""
    head = (
        f'<head><meta charset="utf-8">{reload}<title>{html.escape(run.config.name)}</title></head>'
    )
    write_atomic(out / "index.html", f"<html>{head}<body>" + "\n".join(parts) + "</body></html>\n")
