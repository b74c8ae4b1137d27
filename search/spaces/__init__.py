"""The search a config describes (`space_for`), and PS+DFS as the composition of the two kinds
(docs/ARCHITECTURE.md, "Search spaces").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from evomerge.merge.architecture import ModelInfo
from evomerge.merge.recipe import PS, Recipe
from evomerge.search.config import SearchConfig
from evomerge.search.spaces.data_flow_space import DataFlowSearch
from evomerge.search.spaces.parameter_space import ParameterSearch
from evomerge.search.spaces.space import Candidate, SearchSpace


class FixedStage(SearchSpace):
    """A parameter-space stage that is not searched (PS+DFS over a finished PS search)."""

    def __init__(self, recipe: Recipe, source: str):
        # pinned: every hub model resolved (on the driver, downloaded) before a worker needs it
        self.recipe = recipe.ps_only().pinned()
        self.source = source

    @property
    def dim(self) -> int:
        return 0

    def labels(self) -> list[str]:
        return []

    def x0(self) -> np.ndarray:
        return np.zeros(0)

    def bounds(self) -> tuple[list[float], list[float]]:
        return [], []

    def decode(self, x, seed: int = 0) -> Recipe:
        return self.recipe

    def encode(self, recipe: Recipe) -> np.ndarray:
        return np.zeros(0)

    def candidate(self, device: str, provided: dict[str, Any] | None = None) -> Candidate:
        from evomerge.fitness.models import model_from_recipe

        model, tokenizer = model_from_recipe(self.recipe, device)
        return _Built(model, tokenizer)

    def baselines(self, experts: list[str] | None = None) -> dict[str, Recipe]:
        return {f"PS stage ({self.source})": self.recipe}

    def references(self) -> dict[str, Recipe]:
        return {"PS stage": self.recipe}

    def card(self, recipe: Recipe) -> str:
        return f"The parameter-space stage is fixed: the best recipe of `{self.source}`.\n"


class _Built:
    """A model built once whose weights never change (a fixed stage)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def materialize(self, recipe: Recipe) -> None:
        pass


class Composed(SearchSpace):
    """PS+DFS: a data-flow path (`flow`) whose `ps` model is a parameter-space stage (`stage`),
    fixed or searched: the genome is the stage's genes followed by the path's."""

    def __init__(self, stage: SearchSpace, flow: DataFlowSearch):
        self.stage, self.flow = stage, flow

    @property
    def dim(self) -> int:
        return self.stage.dim + self.flow.dim

    def _split(self, x) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=float)
        return x[: self.stage.dim], x[self.stage.dim :]

    def labels(self) -> list[str]:
        return [f"ps/{g}" for g in self.stage.labels()] + self.flow.labels()

    def x0(self) -> np.ndarray:
        return np.concatenate([self.stage.x0(), self.flow.x0()])

    def bounds(self) -> tuple[list[float], list[float]]:
        (a, b), (c, d) = self.stage.bounds(), self.flow.bounds()
        return a + c, b + d

    def decode(self, x, seed: int = 0) -> Recipe:
        if np.shape(x) != (self.dim,):
            raise ValueError(f"genome has {self.dim} genes, got a vector of shape {np.shape(x)}")
        xs, xf = self._split(x)
        return self._join(self.stage.decode(xs, seed), self.flow.path(xf))

    def _join(self, stage: Recipe, path: dict) -> Recipe:
        data = stage.model_dump(mode="json", exclude_none=True)
        return Recipe.parse(
            {
                "dtype": self.flow.dtype,
                "models": {**data["models"], **self.flow.models()},
                "parameter_space": data["parameter_space"],
                "data_flow": path,
            }
        )

    def encode(self, recipe: Recipe) -> np.ndarray:
        return np.concatenate([self.stage.encode(recipe.ps_only()), self.flow.encode(recipe)])

    def candidate(self, device: str, provided: dict[str, Any] | None = None) -> Candidate:
        stage = self.stage.candidate(device)
        flow = self.flow.candidate(device, {PS: stage})
        return _ComposedCandidate(stage, flow)

    def problems(self) -> list[str]:
        return self.stage.problems() + self.flow.problems()

    def baselines(self, experts: list[str] | None = None) -> dict[str, Recipe]:
        return self.stage.baselines(experts)

    def references(self) -> dict[str, Recipe]:
        """The stage's references (its parents, or the fixed stage) seen through the identity
        path of the path's embedding model, when that model is the stage."""
        if self.flow.dfs.embed_from != PS:
            return self.flow.references()
        path = self.flow.identity()
        return {label: self._join(r, path) for label, r in self.stage.references().items()}

    def card(self, recipe: Recipe) -> str:
        return self.stage.card(recipe) + "\n" + self.flow.card(recipe)

    def plots(self, recipe: Recipe, out: Path) -> list[str]:
        return self.stage.plots(recipe, out) + self.flow.plots(recipe, out)


class _ComposedCandidate:
    def __init__(self, stage: Candidate, flow: Candidate):
        self.stage, self.flow = stage, flow
        self.model, self.tokenizer = flow.model, flow.tokenizer

    def materialize(self, recipe: Recipe) -> None:
        self.stage.materialize(recipe.ps_only())  # in place: the path shares the stage's layers
        self.flow.materialize(recipe)


def space_for(config: SearchConfig) -> SearchSpace:
    """The search space a config describes (reads each model's config.json, nothing more)."""
    if config.dfs is None:
        return ParameterSearch(config)
    if PS not in {*config.dfs.models, config.dfs.embed_from}:
        return DataFlowSearch(config, ps_layers=None)
    if config.dfs.ps_recipe:
        stage: SearchSpace = FixedStage(config.ps_recipe(), config.dfs.ps_recipe)
    else:
        stage = ParameterSearch(config)
    return Composed(stage, DataFlowSearch(config, ps_layers=_stage_layers(config)))


def _stage_layers(config: SearchConfig) -> int:
    if config.dfs is not None and config.dfs.ps_recipe:
        recipe = config.ps_recipe()
        return ModelInfo.from_dir(recipe.models[recipe.main_alias].local()).num_layers
    return ModelInfo.from_dir(config.model_path(config.base)).num_layers
