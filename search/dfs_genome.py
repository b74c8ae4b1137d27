"""The data-flow genome (Akiba et al. 2024, section 3.2): indicator genes over repeated layer
slots, and scale genes for the moves between layers. Pure: no I/O.

Slots are the layers of the DFS models listed model by model (M in all), repeated r times:
T = M * r indicators; a slot is kept when its gene is > 0, kept slots stay in slot order. The
path always starts with the first and ends with the last layer of the embedding model. The
hidden state moving from layer i to layer j is scaled by 1 + g: with `scales: matrix` one gene
per (i, j) of the M layers, with `model_pair` one per pair of models, with `none` no gene.
"""

from __future__ import annotations

import numpy as np

from evomerge.merge.errors import EvomergeError
from evomerge.merge.recipe import Recipe
from evomerge.search.config import SearchConfig

INDICATOR = 1.0  # initial |gene| of the indicators; bounds are +-1


class DFSGenome:
    def __init__(self, config: SearchConfig, layers: dict[str, int], ps: Recipe | None = None):
        assert config.dfs is not None
        self.config = config
        # resolved once: decode runs per trial
        self.model_paths = {a: str(p) for a, p in config.model_paths().items()}
        self.dfs = config.dfs
        self.ps = ps
        self.layers = layers  # alias -> number of layers
        self.units = [(a, i) for a in self.dfs.models for i in range(layers[a])]  # the M layers
        self.slots = [u for _ in range(self.dfs.repeats) for u in self.units]
        m, n = len(self.units), len(self.dfs.models)
        self.n_scales = {"matrix": m * m, "model_pair": n * n, "none": 0}[self.dfs.scales]
        self.dim = len(self.slots) + self.n_scales

    def x0(self) -> np.ndarray:
        """The embedding model alone: its first repetition kept, the rest excluded, scales 1."""
        first = [
            INDICATOR if (a == self.dfs.embed_from and r == 0) else -INDICATOR
            for r in range(self.dfs.repeats)
            for a, _ in self.units
        ]
        return np.array(first + [self.dfs.scale_range.init] * self.n_scales, dtype=float)

    def bounds(self) -> tuple[list[float], list[float]]:
        r = self.dfs.scale_range
        return (
            [-1.0] * len(self.slots) + [r.low] * self.n_scales,
            [1.0] * len(self.slots) + [r.high] * self.n_scales,
        )

    def labels(self) -> list[str]:
        names = [f"slot{t}:{a}.{i}" for t, (a, i) in enumerate(self.slots)]
        if self.dfs.scales == "matrix":
            names += [f"scale:{a}.{i}->{b}.{j}" for a, i in self.units for b, j in self.units]
        elif self.dfs.scales == "model_pair":
            names += [f"scale:{a}->{b}" for a in self.dfs.models for b in self.dfs.models]
        return names

    def _scale(self, g: np.ndarray, src: tuple[str, int], dst: tuple[str, int]) -> float:
        r = self.dfs.scale_range
        if self.dfs.scales == "none":
            return 1.0
        if self.dfs.scales == "matrix":
            k = self.units.index(src) * len(self.units) + self.units.index(dst)
        else:
            models = self.dfs.models
            k = models.index(src[0]) * len(models) + models.index(dst[0])
        return 1.0 + float(min(max(g[k], r.low), r.high))

    def decode(self, x, seed: int = 0) -> Recipe:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise ValueError(f"genome has {self.dim} genes, got a vector of shape {x.shape}")
        embed = self.dfs.embed_from
        kept = [s for s, g in zip(self.slots, x[: len(self.slots)], strict=True) if g > 0]
        first, last = (embed, 0), (embed, self.layers[embed] - 1)
        if not kept or kept[0] != first:
            kept.insert(0, first)
        if kept[-1] != last:
            kept.append(last)
        lo, hi = self.dfs.min_hops, self.dfs.max_hops
        if len(kept) < lo or (hi is not None and len(kept) > hi):
            raise EvomergeError(f"path has {len(kept)} hops, outside [{lo}, {hi}]")
        g = x[len(self.slots) :]
        path = [{"model": kept[0][0], "layer": kept[0][1], "scale": 1.0}]
        for prev, hop in zip(kept, kept[1:], strict=False):
            path.append({"model": hop[0], "layer": hop[1], "scale": self._scale(g, prev, hop)})
        models = {a: {"path": p} for a, p in self.model_paths.items()}
        data: dict = {
            "dtype": self.config.space.dtype,
            "models": models,
            "data_flow": {"embed_from": embed, "path": path},
        }
        if self.ps is not None:
            ps_data = self.ps.model_dump(mode="json", by_alias=True, exclude_none=True)
            data["models"] = {**ps_data["models"], **models}
            data["parameter_space"] = ps_data["parameter_space"]
        return Recipe.parse(data)
