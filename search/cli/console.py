"""A search in the terminal: the progress bar, Ctrl-C and SIGTERM, the closing line."""

from __future__ import annotations

import os
import signal

from rich.console import Console

from evomerge.search.trial import TrialRecord

console = Console(stderr=True)


def _search_progress(run):
    """A rich progress bar over evaluations, with generation, best and mean fitness, and ETA.
    It starts from the journal: a resumed (or finished) run shows where it stands."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from evomerge.search.loop.driver import Progress as Hooks

    bar = Progress(
        TextColumn("[bold]gen {task.fields[gen]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "best {task.fields[best]:.4f}{task.fields[parents]}  last {task.fields[last]:.4f}"
        ),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        # the ETA's rate over the last 30 minutes (rich's default, 30 s, shows no ETA at all
        # once a trial takes longer than that)
        speed_estimate_period=1800,
    )
    trials = run.journal().trials  # as journaled: the bar needs no recipe
    finished = [t for t in trials.values() if t.is_finished()]
    last = max(finished, key=lambda t: t.time or 0, default=None)
    task = bar.add_task(
        "search",
        total=None,
        gen=max((g for g, _ in trials), default=0),
        best=float("nan"),
        last=last.fitness if last is not None and last.fitness is not None else float("nan"),
        parents="",
    )

    def start(done: int, budget: int, best: float, parents: dict[str, float]) -> None:
        # the parents' search-split scores: the line the best must clear
        line = ", ".join(f"{k} {v:.3f}" for k, v in sorted(parents.items(), key=lambda kv: -kv[1]))
        if parents:
            console.print(f"parents on the search split: {line}")
        top = max(parents.values(), default=None)
        bar.start()
        # reset, not update: the journal's evaluations are not this session's speed
        bar.reset(task, completed=done, total=budget)
        bar.update(task, best=best, parents=f" (best parent {top:.4f})" if top is not None else "")

    def result(done: int, record: TrialRecord, best: float) -> None:
        bar.update(task, completed=done, gen=record.generation, best=best, last=record.fitness)

    return bar, Hooks(
        on_start=start, on_result=result, on_generation=lambda line: bar.console.print(line)
    )


def run_and_report(run, report_to: list[str] | None = None, after=None) -> TrialRecord | None:
    """Run or resume; Ctrl-C keeps every finished trial and exits 130 with a resumable run.
    `report_to` overrides the trackers (search.trackers.session_trackers); `after(best,
    reporter)` runs once the search is done, while the trackers' runs are still open."""
    from evomerge.search.loop.driver import run_search
    from evomerge.search.loop.workers import make_executor
    from evomerge.search.watch.trackers import Reporter, session_trackers

    bar, hooks = _search_progress(run)
    names = session_trackers(run, report_to)
    reporter = None
    if names:
        reporter = Reporter(run, names, warn=_warn_line, info=lambda line: console.print(line))
        hooks = reporter.hooks(hooks)
    status = "FAILED"  # what the trackers' runs end as, unless the search gets further
    received: list[int] = []

    def stop(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    # explicit handlers: a background job may inherit SIGINT ignored, and a cluster scheduler
    # pre-empts with SIGTERM; either way, stop dispatching and leave a resumable run
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        best = run_search(run, lambda: make_executor(run.config), hooks)
        bar.stop()
        _closing_line(run, best)
        if after is not None:
            after(best, reporter)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        bar.stop()
        signum = received[0] if received else signal.SIGINT
        # said in search.log too: `evomerge status` tells an interrupted run from a crash
        run.log(f"interrupted by {signal.Signals(signum).name}")
        console.print(f"interrupted: every finished trial is saved; `evomerge resume {run.path}`")
        raise SystemExit(128 + signum) from None
    finally:
        bar.stop()
        if reporter is not None:
            reporter.close(status)
        warn(run)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return best


def _closing_line(run, best: TrialRecord | None) -> None:
    if best is None:
        console.print("no trial completed")
    else:
        console.print(
            f"best: trial {best.generation}:{best.index}, search fitness "
            f"{best.fitness:.4f}{_rescored(best)}: {run.path / 'best' / 'recipe.yaml'}"
        )


def ensure_zoo(cfg) -> None:
    """Build the zoo a config's relative model paths point into, when it is missing; its tasks'
    Arrow cache stays inside it (a user's own search keeps the user's HF_DATASETS_CACHE)."""
    if cfg.zoo:
        from evomerge.fitness.zoo.build import build_zoo

        zoo = build_zoo(size=cfg.zoo, log=console.print)
        os.environ.setdefault("HF_DATASETS_CACHE", str(zoo / ".hf-datasets"))


def refuse(problems: list[str]) -> None:
    """Every problem on its own line, then exit 2 (nothing started)."""
    for p in problems:
        console.print(f"[bold red]error:[/] {p}", highlight=False, soft_wrap=True)
    if problems:
        raise SystemExit(2)


def _warn_line(line: str) -> None:
    console.print(f"[bold yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


def warn(run) -> None:
    """What reading the run's journal skipped or moved aside, said once."""
    for line in run.warnings:
        console.print(f"[bold yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    run.warnings.clear()


def _rescored(trial: TrialRecord) -> str:
    again = (trial.rescored or {}).get("fitness")
    return "" if again is None else f", {again:.4f} on the rescore items"
