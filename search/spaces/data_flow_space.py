"""The data-flow space (Akiba et al. 2024, 3.2): indicator genes over repeated layer slots, and
scale genes for the moves between layers.

Slots are the layers of the DFS models listed model by model (M in all), repeated r times:
T = M * r indicators; a slot is kept when its gene is > 0, kept slots stay in slot order. The
path always starts with the first and ends with the last layer of the embedding model. The
hidden state moving from layer i to layer j is scaled by 1 + g: with `scales: matrix` one gene
per (i, j) of the M layers, with `model_pair` one per pair of models, with `none` no gene.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from evomerge.merge.architecture import ModelInfo
from evomerge.merge.errors import EvomergeError
from evomerge.merge.recipe import PS, Recipe
from evomerge.search.config import SearchConfig
from evomerge.search.plots import pyplot, save
from evomerge.search.spaces.space import Candidate, SearchSpace

INDICATOR = 1.0  # initial |gene| of the indicators; bounds are +-1


class DataFlowSearch(SearchSpace):
    def __init__(self, config: SearchConfig, ps_layers: int | None):
        """`ps_layers`: the layer count of the parameter-space stage, when the path uses it."""
        assert config.dfs is not None
        self.config = config
        self.dfs = config.dfs
        used = {*self.dfs.models, self.dfs.embed_from}
        # resolved once: decode runs per trial; recipes name models by their pinned references
        self.model_paths = {a: str(p) for a, p in config.model_paths().items()}
        self.model_refs = config.model_refs()
        self.dtype = config.merge_dtype
        self.layers: dict[str, int] = {}  # alias -> number of layers
        types = set()
        for alias in used:
            if alias == PS:
                assert ps_layers is not None
                self.layers[alias] = ps_layers
                continue
            info = ModelInfo.from_dir(Path(self.model_paths[alias]))
            self.layers[alias] = info.num_layers
            types.add(info.model_type)
        if len(types) > 1:
            raise EvomergeError(
                f"dfs.models: the path's models must share one architecture, got {sorted(types)}"
            )
        self.units = [(a, i) for a in self.dfs.models for i in range(self.layers[a])]  # M layers
        self.slots = [u for _ in range(self.dfs.repeats) for u in self.units]
        m, n = len(self.units), len(self.dfs.models)
        self.n_scales = {"matrix": m * m, "model_pair": n * n, "none": 0}[self.dfs.scales]

    @property
    def dim(self) -> int:
        return len(self.slots) + self.n_scales

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

    def _scale_index(self, src: tuple[str, int], dst: tuple[str, int]) -> int:
        if self.dfs.scales == "matrix":
            return self.units.index(src) * len(self.units) + self.units.index(dst)
        models = self.dfs.models
        return models.index(src[0]) * len(models) + models.index(dst[0])

    def decode(self, x, seed: int = 0) -> Recipe:
        return Recipe.parse(
            {
                "dtype": self.dtype,
                "models": self.models(),
                "data_flow": self.path(x),
            }
        )

    def models(self) -> dict[str, dict]:
        """The recipe's models: every alias the path may use, but the parameter-space stage."""
        return {a: {"path": self.model_refs[a]} for a in sorted(self.layers) if a != PS}

    def path(self, x) -> dict:
        """The data_flow stage a vector decodes to (a PS+DFS recipe adds its stage to it)."""
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
        r = self.dfs.scale_range
        path = [{"model": kept[0][0], "layer": kept[0][1], "scale": 1.0}]
        for prev, hop in zip(kept, kept[1:], strict=False):
            scale = 1.0
            if self.dfs.scales != "none":
                scale += float(min(max(g[self._scale_index(prev, hop)], r.low), r.high))
            path.append({"model": hop[0], "layer": hop[1], "scale": scale})
        return {"embed_from": embed, "path": path}

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The indicator and scale genes of a path: each hop's slot is the first unused one of
        its layer in slot order (the first and last hops of the embedding model are implied)."""
        df = recipe.data_flow
        if df is None:
            raise ValueError("recipe has no data_flow stage")
        x = -INDICATOR * np.ones(self.dim)
        x[len(self.slots) :] = self.dfs.scale_range.init
        cursor = 0
        hops = [(h.model, h.layer) for h in df.path]
        for k, hop in enumerate(hops):
            implied = (k == 0 or k == len(hops) - 1) and hop[0] == self.dfs.embed_from
            try:
                t = self.slots.index(hop, cursor)
            except ValueError:
                if implied:
                    continue
                raise ValueError(f"hop {k} {hop} does not fit the slots in order") from None
            x[t], cursor = INDICATOR, t + 1
            if k > 0 and self.dfs.scales != "none":
                x[len(self.slots) + self._scale_index(hops[k - 1], hop)] = df.path[k].scale - 1
        return x

    def identity(self) -> dict:
        """The embedding model's own path: every layer once, no scaling."""
        embed = self.dfs.embed_from
        hops = [{"model": embed, "layer": i, "scale": 1.0} for i in range(self.layers[embed])]
        return {"embed_from": embed, "path": hops}

    # -- worker side --------------------------------------------------------------------------
    def candidate(self, device: str, provided: dict[str, Any] | None = None) -> Candidate:
        return PathCandidate(self, device, provided or {})

    # -- hooks --------------------------------------------------------------------------------
    def references(self) -> dict[str, Recipe]:
        """The embedding model itself (the path model reads its embeddings and head)."""
        if self.dfs.embed_from == PS:
            return {}  # the composed space scores the stage itself
        recipe = {
            "dtype": self.dtype,
            "models": self.models(),
            "data_flow": self.identity(),
        }
        return {self.dfs.embed_from: Recipe.parse(recipe)}

    def problems(self) -> list[str]:
        from evomerge.merge.dataflow import family

        problems = []
        types = {
            ModelInfo.from_dir(Path(self.model_paths[a])).model_type for a in self.layers if a != PS
        }
        for model_type in types:
            try:
                family(model_type)
            except EvomergeError as e:
                problems.append(f"dfs: {e}")
        try:
            self.decode(self.x0())
        except (ValueError, EvomergeError) as e:
            problems.append(f"dfs: the initial path does not decode: {e}")
        return problems

    def card(self, recipe: Recipe) -> str:
        df = recipe.data_flow
        assert df is not None
        rows = "\n".join(
            f"| {k} | {h.model} | {h.layer} | {h.scale:.3f} |" for k, h in enumerate(df.path)
        )
        return (
            f"A data-flow path of {len(df.path)} hops (embeddings and head from "
            f"`{df.embed_from}`), exported as a plain checkpoint with the scales folded in.\n\n"
            f"| hop | model | layer | scale |\n|---|---|---|---|\n{rows}\n"
        )

    def plots(self, recipe: Recipe, out: Path) -> list[str]:
        plot_path(recipe, out / "path.png")
        return ["path.png"]


class PathCandidate:
    """Source models resident; one path model whose hops are rewired per candidate."""

    def __init__(self, space: DataFlowSearch, device: str, provided: dict[str, Any]):
        from evomerge.fitness.models import load_model
        from evomerge.merge.dataflow import PathModel

        dfs = space.dfs
        models, tokenizers = {}, {}
        for alias in space.layers:
            if alias in provided:
                models[alias], tokenizers[alias] = provided[alias].model, provided[alias].tokenizer
            else:
                path = space.model_paths[alias]
                models[alias], tokenizers[alias] = load_model(path, device, space.dtype)
        self.path = PathModel(models[dfs.embed_from], models)
        n = models[dfs.embed_from].config.num_hidden_layers
        self.model = self.path.set_path([(dfs.embed_from, i, 1.0) for i in range(n)])
        self.tokenizer = tokenizers[dfs.embed_from]

    def materialize(self, recipe: Recipe) -> None:
        df = recipe.data_flow
        assert df is not None
        self.path.set_path([(h.model, h.layer, h.scale) for h in df.path])


def plot_path(recipe: Recipe, path: Path) -> None:
    """A data-flow path: hop against source layer, coloured by model, scales annotated."""
    plt = pyplot()
    df = recipe.data_flow
    assert df is not None
    models = list(dict.fromkeys(h.model for h in df.path))
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(df.path) + 2), 3.5))
    for m, color in zip(models, plt.cm.tab10.colors, strict=False):
        hops = [(k, h) for k, h in enumerate(df.path) if h.model == m]
        ax.scatter([k for k, _ in hops], [h.layer for _, h in hops], color=color, label=m, s=60)
        for k, h in hops:
            if abs(h.scale - 1) > 1e-3:
                ax.annotate(
                    f"x{h.scale:.2f}",
                    (k, h.layer),
                    textcoords="offset points",
                    xytext=(0, 7),
                    ha="center",
                    fontsize=7,
                )
    ax.plot(range(len(df.path)), [h.layer for h in df.path], color="grey", alpha=0.4, zorder=0)
    ax.set_xlabel("hop")
    ax.set_ylabel("source layer")
    ax.legend(fontsize=8)
    save(fig, path)
