"""Where a search stands, read from its run directory alone (`evomerge status`, the report).

The state: `running` while a process holds the run's lock (or, when the lock names another host,
whose locks this machine cannot see, while the journal is fresh); `finished` once the budget is
spent and the rescoring done; `interrupted` when the last session was stopped by Ctrl-C or
SIGTERM; else `crashed` (killed, pre-empted, out of memory: `evomerge resume` goes on).
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from evomerge.merge.errors import EvomergeError
from evomerge.search.run.rundir import LOCK, RunDir, is_run_dir
from evomerge.search.trial import Status, TrialRecord


@dataclass
class RunStatus:
    path: Path
    state: str  # running, finished, interrupted, crashed, new, not a run, unreadable
    detail: str = ""
    done: int = 0
    budget: int | None = None
    best: float | None = None
    rescored: float | None = None
    best_parent: float | None = None
    last_generation: int | None = None
    last_mean: float | None = None
    failures: int = 0
    elapsed: float | None = None  # seconds the search has been running, over all sessions
    eta: float | None = None  # seconds to the end of the budget, while running
    parents: dict[str, float] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.state == "running"


def _gap_limit(run: RunDir) -> float:
    """The longest silence of the journal while a search runs: a trial may take up to its
    timeout, and results arrive at least that often."""
    return 2 * run.config.workers.trial_timeout + 60


def _lock_holder(path: Path) -> tuple[int | None, str | None]:
    try:
        words = (path / LOCK).read_text().split()
    except OSError:
        return None, None
    # "pid 123 on host since ..."
    pid = int(words[1]) if len(words) > 3 and words[0] == "pid" and words[1].isdigit() else None
    host = words[3] if len(words) > 3 and words[2] == "on" else None
    return pid, host


def run_status(path: Path | RunDir, now: float | None = None) -> RunStatus:
    """The status of one run directory; a directory that is not a run, or is unreadable, is a
    status saying so (never an exception). Given a RunDir (a watch asks again and again), its
    journal is followed: only what was appended since the last call is parsed."""
    now = time.time() if now is None else now
    if isinstance(path, RunDir):
        run: RunDir | None = path
        path = path.path
    else:
        path, run = Path(path), None
        if not path.is_dir():
            what = "not a directory" if path.exists() else "not found"
            return RunStatus(path, "not a run", what)
        if not is_run_dir(path):
            return RunStatus(path, "not a run", "no run.yaml")
    try:
        run = run or RunDir.reopen(path)
        journal = run.journal()
        trials, records = journal.trials, journal.records  # as journaled: no recipe is built
        parents = {
            k: v["fitness"] for k, v in run.parents().items() if v.get("fitness") is not None
        }
    except (EvomergeError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return RunStatus(path, "unreadable", str(e).splitlines()[0][:200])
    cfg = run.config
    s = RunStatus(path, "new", budget=cfg.cma.budget, parents=parents)
    s.best_parent = max(parents.values(), default=None)
    finished = [t for t in trials.values() if t.is_finished()]
    s.done = len(finished)
    s.failures = sum(t.status is Status.FAILED for t in finished)
    ranked = run.ranked(trials)
    if ranked:
        s.best = ranked[0].fitness
        s.rescored = (ranked[0].rescored or {}).get("fitness")
    done_gens = sorted({t.generation for t in finished})
    if done_gens:
        s.last_generation = done_gens[-1]
        ok = [
            t.fitness
            for t in finished
            if t.generation == s.last_generation and t.status is Status.COMPLETE
        ]
        s.last_mean = sum(ok) / len(ok) if ok else math.nan  # type: ignore[arg-type]
    times = sorted(r.time for r in records if isinstance(r.time, int | float))
    limit = _gap_limit(run)
    # time spent searching: the journal's gaps, except those long enough to be downtime
    # between a crash and a resume
    s.elapsed = sum(b - a for a, b in zip(times, times[1:]) if b - a <= limit)
    last = times[-1] if times else None
    rescore = cfg.fitness.rescore
    top = sorted(
        (t for t in finished if t.status is Status.COMPLETE),
        key=lambda t: (-(t.fitness or 0.0), t.generation, t.index),
    )[: rescore.top]
    rescoring = rescore.top > 0 and cfg.fitness.limit is not None
    complete = s.done >= cfg.cma.budget and (
        not rescoring or all(t.rescored is not None for t in top)
    )
    s.state, s.detail = _state(run, complete, last, now, limit)
    if s.state == "running" and last is not None:
        if now - last < limit:
            s.elapsed += now - last
        s.eta = _eta(finished, s.done, cfg.cma.budget, limit)
    return s


def _state(
    run: RunDir, complete: bool, last: float | None, now: float, limit: float
) -> tuple[str, str]:
    pid, host = _lock_holder(run.path)
    if run.is_locked():
        return "running", f"pid {pid} on {host}" if pid else ""
    if complete:
        return "finished", ""
    if host and host != socket.gethostname() and last is not None and now - last < limit:
        # an flock is not visible from another host (e.g. over NFS): the journal's age tells
        return "running", f"on {host} (journal written {now - last:.0f} s ago)"
    if last is None and not (run.path / LOCK).exists():
        return "new", "no trial yet"
    log = run.path / "search.log"
    try:
        lines = log.read_text().splitlines() if log.is_file() else []
    except OSError:
        lines = []
    if lines and "interrupted by" in lines[-1]:
        return "interrupted", lines[-1].split("interrupted by", 1)[1].strip()
    alive = pid is not None and host == socket.gethostname() and _alive(pid)
    return "crashed", "" if alive else "resume it with `evomerge resume`"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _eta(finished: list[TrialRecord], done: int, budget: int, limit: float) -> float | None:
    """Seconds to the budget, at the rate of the recent finished trials (this session's)."""
    times = sorted(t.time for t in finished if isinstance(t.time, int | float))
    if done >= budget:
        return 0.0
    recent = times[-24:]
    # only the stretch since the last downtime: a resumed run's rate is this session's
    for k in range(len(recent) - 1, 0, -1):
        if recent[k] - recent[k - 1] > limit:
            recent = recent[k:]
            break
    if len(recent) < 2 or recent[-1] <= recent[0]:
        return None
    rate = (len(recent) - 1) / (recent[-1] - recent[0])
    return (budget - done) / rate


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}"


def number(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def row(s: RunStatus) -> dict[str, str]:
    """One run as the table's cells."""
    best = number(s.best)
    if s.rescored is not None:
        best += f" (rescored {s.rescored:.4f})"
    state = s.state + (f": {s.detail}" if s.detail else "")
    return {
        "run": str(s.path),
        "state": state,
        "evals": f"{s.done}/{s.budget}" if s.budget is not None else "-",
        "best": best,
        "best parent": number(s.best_parent),
        "last gen mean": (
            f"{number(s.last_mean)} (gen {s.last_generation})" if s.last_generation else "-"
        ),
        "failed": str(s.failures) if s.budget is not None else "-",
        "elapsed": duration(s.elapsed),
        "ETA": duration(s.eta) if s.live else "-",
    }


STATE_STYLE = {
    "running": "bold green",
    "finished": "bold blue",
    "interrupted": "yellow",
    "crashed": "bold red",
    "new": "dim",
    "not a run": "red",
    "unreadable": "red",
}


def table(statuses: list[RunStatus]):
    from rich.table import Table
    from rich.text import Text

    t = Table(title="evomerge runs")
    cells = [row(s) for s in statuses]
    t.add_column("run", overflow="fold")  # a long path in full, over several lines
    for name in ("state", "evals", "best", "best parent", "last gen mean", "failed"):
        t.add_column(name, justify="left" if name == "state" else "right")
    t.add_column("elapsed", justify="right")
    t.add_column("ETA", justify="right")
    for s, c in zip(statuses, cells, strict=True):
        style = STATE_STYLE.get(s.state, "")
        # Text, not markup: a path may hold brackets
        t.add_row(*[Text(v, style=style if k == "state" else "") for k, v in c.items()])
    return t
