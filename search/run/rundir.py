"""The run directory: the truth about a search.

    run.yaml                 the config as given, its hash, the pinned model revisions
    trials.jsonl             append-only journal, one fsync'd JSON line per trial state change
                             (its lines and compact recipes: search.journal)
    trials.quarantine.jsonl  lines of the journal that could not be read, moved aside on resume
    best/recipe.yaml         the best trial's recipe, replaced atomically on improvement
    parents.json             the parents' scores on the search split, measured at the start
    search.log               one summary line per generation
    run.lock                 held by the process running the search (pid and host inside)

The journal is the one source of truth: the optimizer's state is rebuilt by replaying it (see
search.driver), so the directory holds no executable state (nothing is ever unpickled).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import yaml

from evomerge.merge.errors import EvomergeError
from evomerge.merge.io.files import read_yaml, write_atomic
from evomerge.merge.recipe import ModelRef, Recipe
from evomerge.search.config import SearchConfig, changed_fields
from evomerge.search.run.journal import Journal, full, line, no_gc, parse_record
from evomerge.search.trial import Status, TrialRecord

__all__ = ["FORMATS", "JOURNAL", "LOCK", "RUN_FORMAT", "RunDir", "is_run_dir", "parse_record"]

# /2: the journal's recipes may be compact (search.journal); /1 runs, started before, are read,
# resumed and appended to as they were written (whole recipes), so their files stay /1 files
RUN_FORMAT = "evomerge-run/2"
FORMATS = ("evomerge-run/1", RUN_FORMAT)
JOURNAL = "trials.jsonl"
QUARANTINE = "trials.quarantine.jsonl"
LOCK = "run.lock"
PARENTS = "parents.json"


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "run.yaml").is_file()


class RunDir:
    def __init__(
        self,
        path: Path,
        config: SearchConfig,
        pinned: dict[str, str] | None = None,
        compact: bool = False,
    ):
        self.path = Path(path)
        self.config = config
        self.warnings: list[str] = []  # what reading the journal skipped, for the user
        self.pinned = pinned  # run.yaml's pinned references: the models of compact recipes
        self.compact = compact  # journal recipes compactly (a run started as evomerge-run/2)
        self._journal: Journal | None = None

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, config: SearchConfig) -> RunDir:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise EvomergeError(f"{path}: is a file; choose another --run-dir")
        if path.exists() and any(path.iterdir()):
            raise EvomergeError(
                f"{path}: run directory is in use; resume it with `evomerge resume {path}` "
                "or choose another --run-dir"
            )
        pinned = config.model_refs()  # hub IDs resolved (downloaded) here, before any worker
        meta = {
            "format": RUN_FORMAT,
            "config_hash": config.digest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config": config.dump(),
            "pinned": pinned,  # the exact revisions this run uses, for all of its life
        }
        write_atomic(path / "run.yaml", yaml.safe_dump(meta, sort_keys=False))
        return cls(path, config.pinned(), pinned=dict(pinned), compact=True)

    @classmethod
    def reopen(cls, path: Path, config: SearchConfig | None = None) -> RunDir:
        """The stored config, unless `config` is given and differs (then refuse)."""
        path = Path(path)
        meta_path = path / "run.yaml"
        if not path.is_dir():
            what = "is a file" if path.exists() else "does not exist"
            raise EvomergeError(f"{path}: {what}; give a run directory made by evomerge search")
        if not meta_path.is_file():
            raise EvomergeError(
                f"{path}: not a run directory (no run.yaml); start it with evomerge search"
            )
        meta = read_yaml(meta_path, "run")
        if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise EvomergeError(
                f"{meta_path}: format {found!r}, expected {' or '.join(FORMATS)} (a newer "
                "evomerge may read it)"
            )
        data = meta.get("config")
        if isinstance(data, dict) and isinstance(data.get("space"), dict):
            # a run started before counter masks drew its masks with torch's generator
            data["space"].setdefault("masks", "torch")
        fitness = data.get("fitness") if isinstance(data, dict) else None
        racing = fitness.get("racing") if isinstance(fitness, dict) else None
        if isinstance(racing, dict):  # and before whole-batch chunks raced unrounded ones
            racing.setdefault("whole_batches", False)
        stored = SearchConfig.parse(data, f"{meta_path} (config)")
        if config is not None and "masks" not in config.space.model_fields_set:
            space = config.space.model_copy(update={"masks": stored.space.masks})
            config = config.model_copy(update={"space": space})
        if config is not None and "whole_batches" not in config.fitness.racing.model_fields_set:
            rc = config.fitness.racing.model_copy(
                update={"whole_batches": stored.fitness.racing.whole_batches}
            )
            config = config.model_copy(
                update={"fitness": config.fitness.model_copy(update={"racing": rc})}
            )
        if config is not None and config.digest() != stored.digest():
            fields = changed_fields(stored.decisions(), config.decisions())
            raise EvomergeError(
                f"{path}: the config changed since the run started ({', '.join(fields)}); "
                "resume with the original config or start a new run directory"
            )
        run_config = config or stored
        pinned = meta.get("pinned")
        if isinstance(pinned, dict) and set(pinned) == set(run_config.models):
            # the revisions the run started with, not wherever a branch points today
            models = {a: ModelRef(path=str(ref)) for a, ref in pinned.items()}
            run_config = run_config.model_copy(update={"models": models})
        refs: dict[str, str] | None = None
        if isinstance(pinned, dict) and all(isinstance(r, str) for r in pinned.values()):
            refs = {str(a): r for a, r in pinned.items()}  # what compact recipes' models are
        return cls(path, run_config, pinned=refs, compact=meta["format"] == RUN_FORMAT)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run for this process: a second search or resume on it is refused, naming
        the holder. The OS releases the lock when the process dies, however it dies."""
        path = self.path / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise EvomergeError(
                    f"{self.path}: in use by {holder}; wait for it to finish or stop it first"
                ) from None
            os.ftruncate(fd, 0)
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            os.pwrite(
                fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0
            )
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def is_locked(self) -> bool:
        """True while some process holds the run (a running search)."""
        path = self.path / LOCK
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    # -- journal ------------------------------------------------------------------------------
    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL

    def journal(self, update: bool = True) -> Journal:
        """The journal, parsed once per RunDir and followed: each call reads only the lines
        appended since the last (`update=False`: not even that, a snapshot for one report).
        Its records and trials are as journaled (compact recipes unbuilt: `records()` and
        `trials()` build them); a reader that needs no recipe uses these."""
        if self._journal is None:
            self._journal = Journal(self.journal_path, self.pinned)
            update = True
        if update and self._journal.update():
            bad = self._journal.bad
            if bad:
                lines = ", ".join(f"{n} ({why})" for n, why, _ in bad[:5])
                more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                warning = f"{self.journal_path}: skipped unreadable line(s) {lines}{more}"
                if warning not in self.warnings:
                    self.warnings.append(warning)
        return self._journal

    def repair_journal(self) -> None:
        """Before appending (resume): move unreadable lines to the quarantine file, with their
        line numbers, and rewrite the journal with the valid lines only (atomically, byte for
        byte), so new records follow a clean line. Nothing valid is dropped."""
        journal = self.journal()
        bad = journal.bad
        if not bad and journal.terminated:
            return
        if bad:
            with open(self.path / QUARANTINE, "ab") as f:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
                for n, why, raw in bad:
                    note = {"quarantined": stamp, "line": n, "why": why}
                    f.write(json.dumps(note).encode() + b"\n" + raw + b"\n")
                f.flush()
                os.fsync(f.fileno())
            self.warnings.append(
                f"{self.journal_path}: moved {len(bad)} unreadable line(s) "
                f"({', '.join(str(n) for n, _, _ in bad[:5])}{'...' if len(bad) > 5 else ''}) "
                f"to {QUARANTINE}"
            )
        skip = {n for n, _, _ in bad}
        lines = self.journal_path.read_bytes().split(b"\n")
        kept = [raw for n, raw in enumerate(lines, start=1) if raw.strip() and n not in skip]
        write_atomic(self.journal_path, b"".join(raw + b"\n" for raw in kept))
        journal.update()  # a new file: read again from its start

    def append(self, records: Sequence[dict | TrialRecord]) -> None:
        """Append records (recipes compact where the run's format allows) and make them
        durable before returning."""
        data = self.journal().pack(records) if self.compact else b"".join(line(r) for r in records)
        with open(self.journal_path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[TrialRecord]:
        """Every valid record (line), in order, recipes rebuilt."""
        with no_gc():
            return [full(r) for r in self.journal().records]

    def trials(self) -> dict[tuple[int, int], TrialRecord]:
        """(generation, index) -> the trial's latest state, fields merged over its records,
        recipes rebuilt."""
        with no_gc():
            return {k: full(t) for k, t in self.journal().trials.items()}

    def full(self, trial: TrialRecord) -> TrialRecord:
        """A record or trial of `journal()` with its recipe rebuilt."""
        return full(trial)

    def ranked(
        self, trials: Mapping[tuple[int, int], TrialRecord] | None = None
    ) -> list[TrialRecord]:
        """COMPLETE trials, best first: those scored again at the end (`rescored`) by that
        score, then the rest by search fitness; ties by trial order. Of `trials()` unless
        given (`journal().trials`: ranked without building a recipe)."""
        state = self.trials() if trials is None else trials
        done = [t for t in state.values() if t.status is Status.COMPLETE]

        def key(t: TrialRecord) -> tuple:
            rescored = (t.rescored or {}).get("fitness")
            first = (0, -rescored) if rescored is not None else (1, -(t.fitness or 0.0))
            return (*first, t.generation, t.index)

        return sorted(done, key=key)

    def parents(self) -> dict[str, dict]:
        """The parents' search-split scores (label -> fitness, metrics), once measured."""
        path = self.path / PARENTS
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_parents(self, scores: dict[str, dict]) -> None:
        write_atomic(self.path / PARENTS, json.dumps(scores, indent=2) + "\n")

    # -- best and log -------------------------------------------------------------------------
    def write_best(self, trial: TrialRecord) -> None:
        best = self.path / "best"
        Recipe.parse(trial.recipe).save(best / "recipe.yaml")
        keys = ("generation", "index", "fitness", "metrics", "rescored", "x")
        summary = {k: trial[k] for k in keys if k in trial}
        write_atomic(best / "trial.json", json.dumps(summary, indent=2) + "\n")

    def log(self, line: str) -> None:
        with open(self.path / "search.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
