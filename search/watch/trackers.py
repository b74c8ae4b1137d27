"""Experiment trackers: a search as one run in TensorBoard, MLflow or Weights & Biases.

`report_to` (config, or `--report-to`) names the trackers, as Hugging Face Trainer's argument
does. Each is an optional extra, imported only when chosen. A `Reporter` observes the driver's
`Progress` events and fans them out to the trackers; the driver knows nothing about them.

What is logged, against one x-axis (`evaluations`: a trial's position in the journal's order of
finished trials, the same in every session):
  once       the resolved config; the parents' search-split fitness
  per trial  trial/fitness, trial/failed, trial/merge_seconds, trial/eval_seconds, and every
             task metric as metrics/<task>/<metric>
  per gen.   generation/best, /mean, /spread (standard deviation), /worst, /failed, and
             search/best (the best so far)
  at the end best/fitness (and best/rescored_fitness), the best recipe as an artifact, and the
             held-out table when `evomerge demo` or `evomerge export` scores one

Guarantees:
- Logging never kills or stalls a search: every tracker call runs on one background thread, and
  a tracker that raises is reported in one warning line and dropped for the rest of the session.
- A resumed search continues the same tracker run: RUN_DIR/trackers.jsonl keeps each tracker's
  run id and a ledger of what it logged (trials by generation:index, generations, the config).
  On resume the journal's trials that the ledger lacks are logged (so `--report-to` added on a
  resume back-fills the whole search), and nothing is logged twice. The ledger is appended to
  (one fsync'd line per call) right after each tracker call returns, and compacted (one line
  per tracker, rewritten atomically) when a session opens the trackers: a 10,000-trial search
  no longer rewrites a growing file per trial. A kill inside the window between a tracker's
  write and the ledger's (milliseconds) is closed by the trackers' own state where they keep
  one: TensorBoard purges steps past the ledger (`purge_step`), MLflow's metric history is read
  back on resume. A run directory's `trackers.json` (the ledger before, one JSON object
  rewritten whole) is read when there is no `trackers.jsonl`, and replaced by it.

Ledger lines: `{"tracker": NAME, "entry": {...}}` (the tracker's whole entry: ids, `logged`,
`last_step`), `{"tracker": NAME, "logged": SECTION, "item": ITEM, "step": STEP}` (one call:
ITEM appended to the section's list, or absent: the section logged once; `best` holds the best
trial's id; STEP raises `last_step`).
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.merge.io.files import write_atomic
from evomerge.search.config import TRACKERS
from evomerge.search.loop.driver import Progress
from evomerge.search.run.rundir import RunDir
from evomerge.search.trial import Status, TrialRecord
from evomerge.search.watch.tracker_backends import BACKENDS

LEDGER = "trackers.jsonl"
OLD_LEDGER = "trackers.json"  # the ledger of runs started before: read, then replaced
# what `pip install` needs for each tracker (the extras in pyproject.toml)
EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
CLOSE_TIMEOUT = float(os.environ.get("EVOMERGE_TRACKER_TIMEOUT", "60"))


def finite(value: object) -> float | None:
    """A number a tracker accepts (NaN and inf are dropped: some trackers refuse them)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def trial_metrics(record: TrialRecord) -> dict[str, float]:
    """One finished trial's scalars (the journal record's fields, renamed for the trackers)."""
    out = {
        "trial/fitness": finite(record.fitness),
        "trial/failed": float(record.status is Status.FAILED),
        "trial/merge_seconds": finite(record.merge_seconds),
        "trial/eval_seconds": finite(record.eval_seconds),
        "trial/generation": float(record.generation),
    }
    for key, value in (record.metrics or {}).items():
        out[f"metrics/{key}"] = finite(value)
    return {k: v for k, v in out.items() if v is not None}


def generation_metrics(trials: list[TrialRecord], best_so_far: float | None) -> dict[str, float]:
    ok = [t.fitness for t in trials if t.status is Status.COMPLETE and t.fitness is not None]
    out: dict[str, float | None] = {
        "generation/failed": float(sum(t.status is Status.FAILED for t in trials)),
        "generation/index": float(trials[0].generation),
        "search/best": best_so_far,
    }
    if ok:
        mean = sum(ok) / len(ok)
        out |= {
            "generation/best": max(ok),
            "generation/mean": mean,
            "generation/worst": min(ok),
            "generation/spread": math.sqrt(sum((f - mean) ** 2 for f in ok) / len(ok)),
        }
    return {k: v for k, v in ((k, finite(v)) for k, v in out.items()) if v is not None}


def _default_warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


class Reporter:
    """The fan-out: driver events in, tracker calls out, on a background thread.

    `hooks(progress)` returns a Progress that calls `progress` and this reporter; `close()`
    ends the trackers' runs (call it in a `finally`). A tracker that raises is dropped after
    one warning line; the search never sees the exception."""

    def __init__(
        self,
        run: RunDir,
        names: list[str],
        warn: Callable[[str], None] = _default_warn,
        info: Callable[[str], None] | None = None,
        backends: dict[str, Callable[[], Any]] | None = None,
    ):
        self.run, self.names, self.warn = run, list(names), warn
        self.info = info or (lambda line: None)
        self.backends = backends or BACKENDS
        self.ledger = read_ledger(run.path, warn)
        self._seen: dict[tuple[str, str], set] = {}  # (tracker, section) -> items logged
        self.steps: dict[tuple[int, int], int] = {}  # trial -> evaluations (journal order)
        self.backlog = self._journal()  # read before the thread starts: it needs the steps
        self.trackers: dict[str, Any] = {}
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="evomerge-trackers", daemon=True)
        self.thread.start()
        self.queue.put(("open",))

    # -- the driver's side: cheap, never raises --------------------------------------------
    def hooks(self, progress: Progress | None = None) -> Progress:
        p = progress or Progress()

        def start(done, budget, best, parents):
            p.on_start(done, budget, best, parents)
            self.started(parents)

        def result(done, record, best):
            self.result(record)  # first: the record is journaled, whatever the display does
            p.on_result(done, record, best)

        def generation_end(g, trials):
            p.on_generation_end(g, trials)
            self.generation(g, trials)

        def finish(best):
            p.on_finish(best)
            self.finish(best)

        return Progress(
            on_start=start,
            on_result=result,
            on_generation=p.on_generation,
            on_generation_end=generation_end,
            on_finish=finish,
        )

    def started(self, parents: dict[str, float]) -> None:
        """The search starts: the parents' scores, then the journal's finished trials and whole
        generations, which each tracker logs where its ledger lacks them."""
        self.queue.put(("parents", dict(parents)))
        for event in self.backlog:
            self.queue.put(event)
        self.backlog = []

    def _journal(self) -> list[tuple]:
        """The journal's finished trials, numbered in order, each followed by its generation
        when that is whole (every trial asked in it finished), as tracker events."""
        state: dict[tuple[int, int], TrialRecord] = {}
        order = []
        for r in self.run.journal().records:  # as journaled: no recipe is built
            key = r.key
            if r.status is None:
                continue  # a rescoring annotation, not a state change
            state[key] = state[key].merged(r) if key in state else r
            if r.is_finished() and key not in self.steps:
                self.steps[key] = len(self.steps) + 1
                order.append(key)
        by_gen: dict[int, list[TrialRecord]] = {}
        for key, t in state.items():
            by_gen.setdefault(key[0], []).append(t)
        last_of = {
            max(self.steps[(g, t.index)] for t in ts): (g, ts)
            for g, ts in by_gen.items()
            if all(t.is_finished() for t in ts)
        }
        events: list[tuple] = []
        for key in order:
            step = self.steps[key]
            events.append(("trial", key, step, state[key]))
            if step in last_of:
                g, ts = last_of[step]
                events.append(("generation", g, step, sorted(ts, key=lambda t: t.index)))
        return events

    # records are values (never changed once built): the tracker thread may hold them as given
    def result(self, record: TrialRecord) -> None:
        key = record.key
        if key not in self.steps:
            self.steps[key] = len(self.steps) + 1
        self.queue.put(("trial", key, self.steps[key], record))

    def generation(self, g: int, trials: list[TrialRecord]) -> None:
        step = max(self.steps.get((g, t.index), 0) for t in trials)
        self.queue.put(("generation", g, step, list(trials)))

    def finish(self, best: TrialRecord | None) -> None:
        if best is not None:
            self.queue.put(("best", len(self.steps), best))

    def table(self, name: str, rows: list[dict], markdown: str) -> None:
        """A table the driver does not know (the held-out scores of `demo` and `export`)."""
        self.queue.put(("table", name, rows, markdown))

    def close(self, status: str = "FINISHED", timeout: float = CLOSE_TIMEOUT) -> None:
        """Wait for what is queued (at most `timeout` seconds), then end the trackers' runs."""
        self.queue.put(("close", status))
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.warn(
                f"trackers still busy after {timeout:.0f} s ({', '.join(self.trackers)}); "
                "leaving them (the run directory has everything)"
            )

    # -- the tracker thread ----------------------------------------------------------------
    def _work(self) -> None:
        best_so_far: float | None = None
        while True:
            event = self.queue.get()
            kind = event[0]
            if kind == "open":
                self._open()
            elif kind == "parents":
                values = {f"parents/{k}": v for k, v in event[1].items() if finite(v) is not None}
                if values:
                    self._call("parents", None, "scalars", 0, values)
            elif kind == "trial":
                _, key, step, record = event
                if record.status is Status.COMPLETE:
                    f = record.fitness
                    best_so_far = f if best_so_far is None else max(best_so_far, f)
                values = trial_metrics(record)
                self._call("trials", f"{key[0]}:{key[1]}", "scalars", step, values, step=step)
            elif kind == "generation":
                _, g, step, trials = event
                values = generation_metrics(trials, best_so_far)
                self._call("generations", str(g), "scalars", step, values)
            elif kind == "best":
                self._best(event[1], event[2])
            elif kind == "table":
                _, name, rows, markdown = event
                self._call("tables", name, "table", name, rows, markdown)
            elif kind == "close":
                for name, tracker in list(self.trackers.items()):
                    self._guard(name, tracker.close, event[1])
                self.trackers.clear()
                return

    def _open(self) -> None:
        for name in self.names:
            factory = self.backends.get(name)
            if factory is None:
                self.warn(f"report_to: unknown tracker {name!r}")
                continue
            saved = self.ledger.get(name, {})
            tracker = factory()
            try:
                ids = tracker.open(self.run, saved)
            except ImportError as e:
                self.warn(
                    f"report_to: {name} is not installed ({e.name or e}); "
                    f"pip install 'evomerge[{EXTRAS[name]}]' (the search goes on without it)"
                )
                continue
            except Exception as e:  # noqa: BLE001 - a tracker never stops a search
                self.warn(f"{name}: {_why(e)}; not logging to {name} (the search goes on)")
                continue
            entry = saved if _same_target(saved, ids) else {}
            if saved and not entry:
                self.warn(f"{name}: a new tracker run ({ids}); the old one was elsewhere")
            entry |= ids
            entry.setdefault("logged", {})
            self.ledger[name] = entry
            self.trackers[name] = tracker
            if not self._guard(name, self._reconcile, tracker, entry):
                continue
            self.info(f"{name}: {tracker.where()}")
        self._seen.clear()  # reconciling changed what the entries hold
        self._compact()
        self._call("config", None, "config", self.run.config.dump())

    def _reconcile(self, tracker: Any, entry: dict) -> None:
        """Trials the tracker has (by its own record) that the ledger missed: a kill between
        a tracker's write and the ledger's."""
        have = tracker.logged_steps()
        if have:
            logged = set(entry["logged"].get("trials", []))
            logged |= {f"{g}:{i}" for (g, i), s in self.steps.items() if s in have}
            entry["logged"]["trials"] = sorted(logged)

    def _call(
        self, section: str, item: str | None, method: str, *args, step: int | None = None
    ) -> None:
        """Call `method(*args)` on each live tracker whose ledger lacks `item` of `section`
        (None: the section is logged once), then record it in the ledger (and `step` as the
        last step logged: TensorBoard's purge point on resume)."""
        notes = []
        for name, tracker in list(self.trackers.items()):
            logged = self.ledger[name]["logged"]
            if logged.get(section) is True or item in self._items(name, section):
                continue
            if self._guard(name, getattr(tracker, method), *args):
                note: dict = {"tracker": name, "logged": section}
                if item is None:
                    logged[section] = True
                else:
                    logged.setdefault(section, []).append(item)
                    self._items(name, section).add(item)
                    note["item"] = item
                if step is not None:
                    entry = self.ledger[name]
                    entry["last_step"] = max(step, entry.get("last_step") or 0)
                    note["step"] = step
                notes.append(note)
        self._note(notes)

    def _items(self, name: str, section: str) -> set:
        """The items of a ledger's section, as a set: a check per trial of a 10,000-trial
        search against a list would be quadratic on resume."""
        key = (name, section)
        if key not in self._seen:
            items = self.ledger[name]["logged"].get(section)
            self._seen[key] = set(items) if isinstance(items, list) else set()
        return self._seen[key]

    def _best(self, step: int, best: TrialRecord) -> None:
        key = f"{best.generation}:{best.index}"
        files = {
            p.name: p
            for p in (self.run.path / "best" / "recipe.yaml", self.run.path / "best" / "trial.json")
            if p.is_file()
        }
        values = {"best/fitness": finite(best.fitness)}
        values["best/rescored_fitness"] = finite((best.rescored or {}).get("fitness"))
        values = {k: v for k, v in values.items() if v is not None}

        notes = []

        def log(name, t, entry):
            if entry["logged"].get("best") == key:
                return
            t.scalars(step, values)
            if "recipe.yaml" in files:
                t.best(step, best, files)
            entry["logged"]["best"] = key
            notes.append({"tracker": name, "logged": "best", "item": key})

        for name, tracker in list(self.trackers.items()):
            self._guard(name, log, name, tracker, self.ledger[name])
        self._note(notes)

    def _guard(self, name: str, fn, *args) -> bool:
        """Run one tracker call; an exception is one warning and the tracker is dropped."""
        if name not in self.trackers:
            return False
        try:
            fn(*args)
            return True
        except Exception as e:  # noqa: BLE001 - a tracker never stops a search
            self.warn(f"{name}: {_why(e)}; no more logging to {name} (the search goes on)")
            self.trackers.pop(name, None)
            return False

    def _note(self, notes: list[dict]) -> None:
        """Append what was just logged to the ledger, durably (fsync'd before returning)."""
        if not notes:
            return
        path = self.run.path / LEDGER
        try:
            with open(path, "ab") as f:
                f.write(b"".join(_ledger_line(n) for n in notes))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self.warn(f"{path}: {e.strerror}; tracker ledger not saved")

    def _compact(self) -> None:
        """The ledger as one line per tracker (atomically): what a session starts from. A
        ledger of the old form (trackers.json) is replaced by it."""
        path = self.run.path / LEDGER
        if not self.ledger and not path.exists():
            return
        try:
            write_ledger(self.run.path, self.ledger)
        except OSError as e:
            self.warn(f"{path}: {e.strerror}; tracker ledger not saved")


def _same_target(saved: dict, ids: dict) -> bool:
    """The tracker run is the one the ledger describes (same store and run id)."""
    return bool(saved) and all(saved.get(k) == v for k, v in ids.items())


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _ledger_line(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def write_ledger(run_dir: Path, ledger: dict[str, dict]) -> None:
    """The ledger compacted, one entry line per tracker, replacing the file atomically (and a
    run's old trackers.json, once the new ledger holds everything it held)."""
    lines = [_ledger_line({"tracker": n, "entry": e}) for n, e in ledger.items()]
    write_atomic(Path(run_dir) / LEDGER, b"".join(lines))
    (Path(run_dir) / OLD_LEDGER).unlink(missing_ok=True)


def read_ledger(run_dir: Path, warn: Callable[[str], None] = _default_warn) -> dict:
    """Tracker name -> its entry (ids, `logged`, `last_step`): trackers.jsonl folded line by
    line, or a run's old trackers.json. An unreadable line is skipped (one warning); a last
    line cut by a kill only loses the call it recorded, which the trackers' own state covers
    (see the module's guarantees), so it is skipped without one."""
    path = Path(run_dir) / LEDGER
    if not path.is_file():
        return _read_old_ledger(Path(run_dir) / OLD_LEDGER, warn)
    try:
        data = path.read_bytes()
    except OSError:
        warn(f"{path}: unreadable; trackers start new runs")
        return {}
    ledger: dict[str, dict] = {}
    seen: dict[tuple[str, str], set] = {}
    lines = data.split(b"\n")
    bad = 0
    for n, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            ok = isinstance(record, dict) and _fold(ledger, seen, record)
        except (ValueError, UnicodeDecodeError):
            ok = False
        cut = n == len(lines) - 1  # no newline after it: a write the kill cut short
        bad += not ok and not cut
    if bad:
        warn(f"{path}: skipped {bad} unreadable line(s)")
    return ledger


def _fold(ledger: dict[str, dict], seen: dict[tuple[str, str], set], record: dict) -> bool:
    """Apply one ledger line; False when it is not one."""
    name = record.get("tracker")
    if not isinstance(name, str):
        return False
    if "entry" in record:
        entry = record["entry"]
        if not isinstance(entry, dict) or not isinstance(entry.setdefault("logged", {}), dict):
            return False
        ledger[name] = entry
        for key in [k for k in seen if k[0] == name]:
            del seen[key]
        return True
    section, item, step = record.get("logged"), record.get("item"), record.get("step")
    if not isinstance(section, str):
        return False
    entry = ledger.setdefault(name, {"logged": {}})
    logged = entry["logged"]
    if section == "best":
        logged["best"] = item
    elif item is None:
        logged[section] = True
    else:
        items = logged.setdefault(section, [])
        if not isinstance(items, list):
            return False
        have = seen.setdefault((name, section), set(items))
        if item not in have:
            have.add(item)
            items.append(item)
    if type(step) is int:
        entry["last_step"] = max(step, entry.get("last_step") or 0)
    return True


def _read_old_ledger(path: Path, warn: Callable[[str], None]) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if isinstance(v, dict)}
    except (OSError, ValueError):
        pass
    warn(f"{path}: unreadable; trackers start new runs")
    return {}


def session_trackers(run: RunDir, override: list[str] | None = None) -> list[str]:
    """The trackers of this session: `--report-to` when given; else the config's, plus any
    tracker that already holds a run of this search (a resume keeps logging where the search
    logged before)."""
    if override is not None:
        return override
    names = list(run.config.report_to)
    # an unreadable ledger adds nothing (the Reporter, reading it again, says so)
    names += [n for n in read_ledger(run.path, warn=lambda line: None) if n in TRACKERS]
    return list(dict.fromkeys(names))


def log_table(run: RunDir, name: str, rows: list[dict], markdown: str, warn=_default_warn) -> None:
    """Add a table to the search's tracker runs after the search (demo, export)."""
    names = session_trackers(run)
    if not names:
        return
    reporter = Reporter(run, names, warn=warn)
    reporter.table(name, rows, markdown)
    reporter.close()
