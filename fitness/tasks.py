"""Fitness task specs, and the zoo's local lm-eval tasks.

Local tasks are defined in `configs/tasks/*.yaml` with the placeholder `ZOO_DIR` where the data
lives; the zoo build renders them into `<zoo>/tasks/` with its own absolute path, since lm-eval's
json loader resolves relative paths against the working directory.

Naming: `zoo_<skill>_<gen|mc>_<search|heldout>`. `search` items are the ones a search optimizes;
`heldout` items are disjoint and used only to report. `gen` tasks generate and score exact match;
`mc` tasks score the log-likelihood of the right answer among four.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.merge.errors import EvomergeError, schema_problems
from evomerge.merge.io.files import write_atomic


def shipped_configs() -> Path:
    """The configs that ship with evomerge: the repository's `configs/` in a checkout, the data
    package `evomerge.configs` in an installed copy."""
    import evomerge.configs

    return Path(next(p for p in evomerge.configs.__path__ if Path(p).is_dir()))


PLACEHOLDER = "ZOO_DIR"


class TaskSpec(BaseModel):
    """One lm-eval task in an objective: which metric, with what weight and direction."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    metric: str | None = None  # None: the task's first metric (exact_match, acc, ...)
    weight: float = 1.0
    direction: Literal["maximize", "minimize"] = "maximize"
    # the share of the task's documents held out of the search: a seeded split, the same for
    # every run and seed, for tasks without a held-out twin (lm-eval's built-in tasks)
    holdout: float | None = Field(None, gt=0, lt=1)

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0 (use direction: minimize to reward lower values)")
        return v


def parse_task_list(text: str) -> list[TaskSpec]:
    """`name[:metric[:weight]],...` as on the command line."""
    specs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, *rest = item.split(":")
        fields: dict = {"name": name}
        if rest and rest[0]:
            fields["metric"] = rest[0]
        if len(rest) > 1:
            fields["weight"] = rest[1]
        if len(rest) > 2 or not name:
            raise EvomergeError(f"--tasks {item!r}: use name[:metric[:weight]]")
        try:
            specs.append(TaskSpec(**fields))
        except ValidationError as e:
            raise EvomergeError(schema_problems(e, f"--tasks {item!r}")) from None
    if not specs:
        raise EvomergeError("--tasks: give at least one task, e.g. --tasks zoo_add_gen_heldout")
    return specs


def zoo_task_name(skill: str, kind: str, split: str) -> str:
    return f"zoo_{skill}_{kind}_{split}"


def holdout_split(name: str, n: int, share: float) -> tuple[list[int], list[int]]:
    """(search documents, held-out documents) of a task with `n` documents: a seeded shuffle
    by task name, so every run, seed and worker splits alike and the two never meet."""
    import random

    order = list(range(n))
    random.Random(f"holdout/{name}").shuffle(order)
    k = max(1, round(share * n))
    return sorted(order[k:]), sorted(order[:k])


def to_split(specs: list[TaskSpec], split: str) -> list[TaskSpec]:
    """The same objective on another split: a task with `holdout` is itself on both sides (the
    Scorer picks the part); the zoo's tasks swap `..._search` for `..._heldout`."""
    out = []
    for s in specs:
        if s.holdout:
            out.append(s)
            continue
        name = s.name
        for old in ("_search", "_heldout"):
            if name.endswith(old):
                name = name[: -len(old)] + f"_{split}"
        out.append(s.model_copy(update={"name": name}))
    return out


def render_zoo_tasks(zoo_dir: Path, source: Path | None = None) -> Path:
    """Write the task YAMLs with the zoo's absolute data path into `<zoo>/tasks/`."""
    source = source or shipped_configs() / "tasks"
    dest = zoo_dir / "tasks"
    dest.mkdir(parents=True, exist_ok=True)
    for yml in sorted(source.glob("*.yaml")):
        text = yml.read_text().replace(PLACEHOLDER, str(zoo_dir.resolve()))
        target = dest / yml.name
        if not target.exists() or target.read_text() != text:
            write_atomic(target, text)  # other processes may be loading these tasks
    return dest
