"""GenomeSpec: vectors <-> recipes. Pure: no I/O, no search state.

Genes, in order: for each group (embed, layer ranges, head; per tensor kind when configured),
the group's own genes (slerp's t, lambda) and then, for each merged model, its per-model genes
(weight, density, ...). A gene's vector value is its parameter value under the `clip`
transform, or a logit under `sigmoid`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from evomerge.merge.recipe import Recipe
from evomerge.merge.registry import get_method
from evomerge.search.config import PER_GROUP_GENES, GeneRange, SearchConfig


@dataclass(frozen=True)
class Gene:
    group: int
    model: str | None  # None for per-group genes
    param: str
    range: GeneRange

    @property
    def label(self) -> str:
        return f"{self.model}.{self.param}" if self.model else self.param


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


class GenomeSpec:
    def __init__(self, config: SearchConfig, num_layers: int):
        self.config = config
        # resolved once: decode runs per trial
        self.model_paths = {a: str(p) for a, p in config.model_paths().items()}
        space = config.space
        self.method = get_method(space.method)
        if self.method.family == "passthrough":
            raise ValueError("passthrough has no parameters to search")
        self.num_layers = num_layers
        kinds = ["attention", "mlp", "other"] if space.tensor_kinds else ["all"]
        k = space.layers_per_group
        self.groups: list[tuple[tuple[int, int] | str, str]] = []
        if space.embed_head_groups:
            self.groups.append(("embed", "all"))
        for start in range(0, num_layers, k):
            for kind in kinds:
                self.groups.append(((start, min(start + k, num_layers)), kind))
        if space.embed_head_groups:
            self.groups.append(("head", "all"))
        merged = list(config.models) if self.method.family == "linear" else config.experts
        if self.method.family == "slerp" and len(config.experts) != 1:
            raise ValueError("slerp merges exactly one model into the base")
        self.models = [] if self.method.family == "slerp" else merged
        names = space.gene_names()
        self.genes: list[Gene] = []
        for gi in range(len(self.groups)):
            for p in names:
                if p in PER_GROUP_GENES:
                    self.genes.append(Gene(gi, None, p, space.range(p)))
            for model in self.models:
                for p in names:
                    if p not in PER_GROUP_GENES:
                        self.genes.append(Gene(gi, model, p, space.range(p)))

    @property
    def dim(self) -> int:
        return len(self.genes)

    def labels(self) -> list[str]:
        return [f"{self._group_label(g.group)}/{g.label}" for g in self.genes]

    def _group_label(self, gi: int) -> str:
        layers, kind = self.groups[gi]
        where = layers if isinstance(layers, str) else f"layers[{layers[0]},{layers[1]})"
        return where if kind == "all" else f"{where}.{kind}"

    # -- transforms ---------------------------------------------------------------------------
    @staticmethod
    def _to_value(x: float, r: GeneRange) -> float:
        if r.transform == "sigmoid":
            return r.low + (r.high - r.low) / (1 + math.exp(-x))
        return min(max(x, r.low), r.high)

    @staticmethod
    def _to_x(v: float, r: GeneRange) -> float:
        if r.transform == "sigmoid":
            return _logit((v - r.low) / (r.high - r.low))
        return v

    def x0(self) -> np.ndarray:
        return np.array([self._to_x(g.range.init, g.range) for g in self.genes])

    def bounds(self) -> tuple[list[float], list[float]]:
        """Box bounds for the optimizer (none on sigmoid genes)."""
        lo = [g.range.low if g.range.transform == "clip" else -math.inf for g in self.genes]
        hi = [g.range.high if g.range.transform == "clip" else math.inf for g in self.genes]
        return lo, hi

    # -- decode / encode ----------------------------------------------------------------------
    def decode(self, x, seed: int = 0) -> Recipe:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise ValueError(f"genome has {self.dim} genes, got a vector of shape {x.shape}")
        space = self.config.space
        group_fields: list[dict] = [{} for _ in self.groups]
        params: list[dict[str, dict]] = [
            {m: dict(space.fixed) for m in self.models} for _ in self.groups
        ]
        for gene, xi in zip(self.genes, x, strict=True):
            value = float(self._to_value(float(xi), gene.range))
            if gene.model is None:
                group_fields[gene.group][gene.param] = value
            else:
                params[gene.group][gene.model][gene.param] = value
        groups = []
        for gi, (layers, kind) in enumerate(self.groups):
            group: dict = {"layers": list(layers) if isinstance(layers, tuple) else layers}
            if kind != "all":
                group["tensors"] = kind
            per_model = params[gi] if self.models else {self.config.experts[0]: {}}
            group["params"] = {
                m: {k: v for k, v in p.items() if k not in PER_GROUP_GENES}
                for m, p in per_model.items()
            }
            group.update(group_fields[gi])
            groups.append(group)
        return Recipe.parse(
            {
                "dtype": space.dtype,
                "models": {a: {"path": p} for a, p in self.model_paths.items()},
                "parameter_space": {
                    "method": space.method,
                    "base": self.config.base,
                    "normalize": space.normalize,
                    "lambda": space.lambda_,
                    "seed": seed,
                    "groups": groups,
                },
            }
        )

    def encode(self, recipe: Recipe) -> np.ndarray:
        ps = recipe.parameter_space
        assert ps is not None
        if len(ps.groups) != len(self.groups):
            raise ValueError(f"recipe has {len(ps.groups)} groups, the genome {len(self.groups)}")
        x = []
        for gene in self.genes:
            group = ps.groups[gene.group]
            if gene.model is None:
                value = group.t if gene.param == "t" else group.lambda_
                assert value is not None, f"group {gene.group} has no {gene.param}"
            else:
                value = getattr(group.params[gene.model], gene.param)
            x.append(self._to_x(value, gene.range))
        return np.array(x)
