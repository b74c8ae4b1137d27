"""The run directory: the truth about a search (layout in DESIGN.md).

run.yaml                 resolved config, format version, config hash
trials.jsonl             append-only journal, one fsync'd JSON line per trial state change
optimizer/gen_NNNN.pkl   optimizer state after tell() of generation NNNN
best/recipe.yaml         the best trial's recipe, replaced atomically on improvement
search.log               one summary line per generation
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from evomerge.merge.errors import EvomergeError
from evomerge.merge.recipe import Recipe, write_atomic
from evomerge.search.config import SearchConfig, changed_fields

RUN_FORMAT = "evomerge-run/1"
ASKED, COMPLETE, FAILED = "ASKED", "COMPLETE", "FAILED"


class RunDir:
    def __init__(self, path: Path, config: SearchConfig):
        self.path = Path(path)
        self.config = config

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, config: SearchConfig) -> RunDir:
        path = Path(path)
        if (path / "run.yaml").exists() or (path.exists() and any(path.iterdir())):
            raise EvomergeError(
                f"{path}: run directory is in use; resume it with `evomerge resume {path}` "
                "or choose another --run-dir"
            )
        (path / "optimizer").mkdir(parents=True, exist_ok=True)
        meta = {
            "format": RUN_FORMAT,
            "config_hash": config.digest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config": config.dump(),
        }
        write_atomic(path / "run.yaml", yaml.safe_dump(meta, sort_keys=False))
        return cls(path, config)

    @classmethod
    def reopen(cls, path: Path, config: SearchConfig | None = None) -> RunDir:
        """Resume: the stored config, unless `config` is given and differs (then refuse)."""
        path = Path(path)
        meta_path = path / "run.yaml"
        if not meta_path.is_file():
            raise EvomergeError(
                f"{path}: not a run directory (no run.yaml); start it with evomerge search"
            )
        meta = yaml.safe_load(meta_path.read_text())
        if meta.get("format") != RUN_FORMAT:
            raise EvomergeError(
                f"{meta_path}: format {meta.get('format')!r}, expected {RUN_FORMAT}"
            )
        stored = SearchConfig.parse(meta["config"], str(meta_path))
        if config is not None and config.digest() != stored.digest():
            fields = changed_fields(stored.decisions(), config.decisions())
            raise EvomergeError(
                f"{path}: the config changed since the run started ({', '.join(fields)}); "
                "resume with the original config or start a new run directory"
            )
        run = cls(path, config or stored)
        run._repair_journal()
        return run

    # -- journal ------------------------------------------------------------------------------
    @property
    def journal_path(self) -> Path:
        return self.path / "trials.jsonl"

    def _repair_journal(self) -> None:
        """Drop a last line cut short by a kill, so appends start on a clean line."""
        if not self.journal_path.exists():
            return
        data = self.journal_path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.journal_path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())

    def append(self, records: list[dict]) -> None:
        """Append records and make them durable before returning."""
        with open(self.journal_path, "a") as f:
            for r in records:
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict]:
        if not self.journal_path.exists():
            return []
        out = []
        for line in self.journal_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line: everything before it is intact
        return out

    def trials(self) -> dict[tuple[int, int], dict]:
        """(generation, index) -> the trial's latest state, fields merged over its records."""
        state: dict[tuple[int, int], dict] = {}
        for r in self.records():
            key = (r["generation"], r["index"])
            state[key] = {**state.get(key, {}), **r}
        return state

    # -- optimizer snapshots ------------------------------------------------------------------
    def snapshot_path(self, generation: int) -> Path:
        return self.path / "optimizer" / f"gen_{generation:04d}.pkl"

    def latest_snapshot(self) -> tuple[int, Path] | None:
        snaps = sorted((self.path / "optimizer").glob("gen_*.pkl"))
        if not snaps:
            return None
        return int(snaps[-1].stem.split("_")[1]), snaps[-1]

    # -- best and log -------------------------------------------------------------------------
    def write_best(self, trial: dict) -> None:
        best = self.path / "best"
        best.mkdir(exist_ok=True)
        Recipe.parse(trial["recipe"]).save(best / "recipe.yaml")
        summary = {k: trial.get(k) for k in ("generation", "index", "fitness", "metrics", "x")}
        write_atomic(best / "trial.json", json.dumps(summary, indent=2) + "\n")

    def log(self, line: str) -> None:
        with open(self.path / "search.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
