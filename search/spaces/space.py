"""A kind of search: its genome, and everything else that depends on the kind, behind one
interface that its users never look past (docs/ARCHITECTURE.md, "Search spaces").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from evomerge.merge.recipe import Recipe

if TYPE_CHECKING:
    import torch


class Candidate(Protocol):
    """A worker's side of a search: sources held on its device, and the one model that every
    candidate is written into (in place) and scored as."""

    model: torch.nn.Module
    tokenizer: Any

    def materialize(self, recipe: Recipe) -> None: ...


class SearchSpace(ABC):
    """Vectors <-> recipes (pure: no I/O once built), plus the kind's worker side and hooks."""

    # -- the genome ---------------------------------------------------------------------------
    @property
    @abstractmethod
    def dim(self) -> int: ...

    @abstractmethod
    def labels(self) -> list[str]: ...

    @abstractmethod
    def x0(self) -> np.ndarray: ...

    @abstractmethod
    def bounds(self) -> tuple[list[float], list[float]]: ...

    @abstractmethod
    def decode(self, x, seed: int = 0) -> Recipe: ...

    @abstractmethod
    def encode(self, recipe: Recipe) -> np.ndarray: ...

    # -- the worker side ----------------------------------------------------------------------
    @abstractmethod
    def candidate(self, device: str, provided: dict[str, Any] | None = None) -> Candidate:
        """Load the sources onto `device` (`provided`: models another stage supplies, by
        alias) and preallocate the model candidates are written into."""

    # -- check, export and report hooks -------------------------------------------------------
    def problems(self) -> list[str]:
        """What `--check` finds wrong beyond what building the space already refused."""
        return []

    def baselines(self, experts: list[str] | None = None) -> dict[str, Recipe]:
        """Untuned merges a user would try by hand (over every expert, or the given ones), for
        the held-out comparison."""
        return {}

    def references(self) -> dict[str, Recipe]:
        """Recipes that reproduce the parents (those the space can express), scored on the
        search split when a search starts: the line its best must clear."""
        return {}

    def mergekit(self, recipe: Recipe) -> dict | None:
        """The recipe as a mergekit config, or None where mergekit cannot express it."""
        return None

    @abstractmethod
    def card(self, recipe: Recipe) -> str:
        """A markdown section describing the recipe's genome, for the model card."""

    def plots(self, recipe: Recipe, out: Path) -> list[str]:
        """Write the report's figures of a recipe into `out`; returns their file names."""
        return []
