"""The parameter space: merge coefficients per layer group, as a genome (Akiba et al. 2024, 3.1).

Groups in order: embed, layer ranges, head (per tensor kind when configured). A gene's vector
value is its parameter value under the `clip` transform, or a logit under `sigmoid`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.merge.architecture import ModelInfo
from evomerge.merge.errors import EvomergeError
from evomerge.merge.lazy import lazy
from evomerge.merge.ops.registry import get_method
from evomerge.merge.placement import Placement
from evomerge.merge.recipe import Recipe
from evomerge.search.config import GeneRange, SearchConfig
from evomerge.search.plots import pyplot, save
from evomerge.search.spaces.space import Candidate, SearchSpace

if TYPE_CHECKING:
    import torch
else:
    torch = lazy("torch")  # for the worker's devices only: `evomerge report` plots without it


@dataclass(frozen=True)
class Gene:
    group: int
    model: str | None  # None for per-group genes
    param: str
    range: GeneRange
    init: float

    @property
    def label(self) -> str:
        return f"{self.model}.{self.param}" if self.model else self.param


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


class ParameterSearch(SearchSpace):
    def __init__(self, config: SearchConfig, num_layers: int | None = None):
        self.config = config
        # resolved once: decode runs per trial; recipes name models by their pinned references
        self.model_paths = {a: str(p) for a, p in config.model_paths().items()}
        self.model_refs = config.model_refs()
        if num_layers is None:
            num_layers = ModelInfo.from_dir(Path(self.model_paths[config.base])).num_layers
        self.num_layers = num_layers
        self.dtype = config.merge_dtype
        space = config.space
        self.method = get_method(space.method)
        if not self.method.param_names:
            raise EvomergeError(f"space.method: {space.method} has no parameters to search")
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
        needs_base = self.method.needs_base
        self.models = [a for a in config.models if not (needs_base and a == config.base)]
        if (problem := self.method.models_problem(len(self.models))) is not None:
            raise EvomergeError(f"space.method: {problem}")
        names = space.gene_names()
        group_params = {p.name for p in self.method.group_params}
        self.genes: list[Gene] = []
        for gi in range(len(self.groups)):
            for p in names:
                if p in group_params:
                    self.genes.append(Gene(gi, None, p, space.range(p), space.start(None, p)))
            for model in self.models:
                for p in names:
                    if p not in group_params:
                        init = space.start(model, p)
                        self.genes.append(Gene(gi, model, p, space.range(p), init))

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
        return np.array([self._to_x(g.init, g.range) for g in self.genes])

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
        group_names = {p.name for p in self.method.group_params}
        group_fixed = {k: v for k, v in space.fixed.items() if k in group_names}
        model_fixed = {k: v for k, v in space.fixed.items() if k not in group_names}
        groups: list[dict] = []
        for layers, kind in self.groups:
            group: dict = {"layers": list(layers) if isinstance(layers, tuple) else layers}
            if kind != "all":
                group["tensors"] = kind
            group["params"] = {m: dict(model_fixed) for m in self.models}
            group.update(group_fixed)
            groups.append(group)
        for gene, xi in zip(self.genes, x, strict=True):
            value = float(self._to_value(float(xi), gene.range))
            target = (
                groups[gene.group]
                if gene.model is None
                else groups[gene.group]["params"][gene.model]
            )
            target[gene.param] = value
        ps: dict = {
            "method": space.method,
            "base": self.config.base,
            "seed": seed,
            "groups": groups,
        }
        if space.normalize is not None:
            ps["normalize"] = space.normalize
        if self.method.random:
            ps["masks"] = space.masks
        return Recipe.parse(
            {
                "dtype": self.dtype,
                "models": {a: {"path": p} for a, p in self.model_refs.items()},
                "parameter_space": ps,
            }
        )

    def encode(self, recipe: Recipe) -> np.ndarray:
        ps = recipe.parameter_space
        if ps is None:
            raise ValueError("recipe has no parameter_space stage")
        if len(ps.groups) != len(self.groups):
            raise ValueError(f"recipe has {len(ps.groups)} groups, the genome {len(self.groups)}")
        x = []
        for gene in self.genes:
            group = ps.groups[gene.group]
            if gene.model is None:
                value = ps.group_values(group)[gene.param]
            else:
                value = ps.model_values(group, gene.model)[gene.param]
            x.append(self._to_x(value, gene.range))
        return np.array(x)

    # -- worker side --------------------------------------------------------------------------
    def candidate(self, device: str, provided: dict[str, Any] | None = None) -> Candidate:
        if self.config.fitness.backend == "vllm":
            return EngineCandidate(self.config, device)
        return ResidentCandidate(self.config, device)

    # -- hooks --------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        try:
            self.decode(self.x0())
        except (ValueError, EvomergeError) as e:
            return [f"space: the initial genome does not decode: {e}"]
        return []

    def baselines(self, experts: list[str] | None = None) -> dict[str, Recipe]:
        """Uniform linear, task arithmetic at several lambdas, TIES and DARE-TIES at density 0.5,
        over every expert (or the given ones)."""
        cfg = self.config
        experts = experts or cfg.experts
        models = {a: p for a, p in self.model_refs.items() if a == cfg.base or a in experts}

        def one(method: str, params: dict, **ps) -> Recipe:
            return Recipe.single_group(
                models, cfg.base, method, self.num_layers, params, dtype=self.dtype, **ps
            )

        out = {"linear (uniform)": one("linear", {a: {"weight": 1.0} for a in models})}
        for lam in (0.3, 0.5, 0.7, 1.0):
            out[f"task arithmetic (lambda {lam})"] = one(
                "task_arithmetic", {e: {"weight": 1.0} for e in experts}, **{"lambda": lam}
            )
        sparse = {e: {"weight": 1.0, "density": 0.5} for e in experts}
        out["ties (density 0.5)"] = one("ties", sparse)
        out["dare_ties (density 0.5)"] = one("dare_ties", sparse, seed=0, masks=cfg.space.masks)
        return out

    def references(self) -> dict[str, Recipe]:
        """Each model alone: a passthrough of it over every layer."""
        models = {a: {"path": p} for a, p in self.model_refs.items()}
        return {
            alias: Recipe.parse(
                {
                    "dtype": self.dtype,
                    "models": models,
                    "parameter_space": {
                        "method": "passthrough",
                        "groups": [{"layers": [0, self.num_layers], "params": {alias: {}}}],
                    },
                }
            )
            for alias in self.config.models
        }

    def mergekit(self, recipe: Recipe) -> dict | None:
        from evomerge.merge.io.checkpoint import Checkpoint
        from evomerge.search.spaces.mergekit_yaml import to_mergekit

        if not self.method.mergekit:
            return None
        base = Checkpoint(self.model_paths[self.config.base])
        return to_mergekit(recipe, base.names, base.info.num_layers)

    def card(self, recipe: Recipe) -> str:
        ps = recipe.parameter_space
        assert ps is not None
        rows = "\n".join(
            f"| {g.label()} | "
            + "; ".join(
                f"{a}: " + ", ".join(f"{k} {v:.3f}" for k, v in ps.model_values(g, a).items())
                for a in ps.merged_models(g)
            )
            + "".join(f"; {k} {v:.3f}" for k, v in g.values.items())
            + " |"
            for g in ps.groups
        )
        return (
            f"Method **{ps.method}** ({self.method.paper}) over base `{ps.base}`.\n\n"
            f"| group | parameters |\n|---|---|\n{rows}\n"
        )

    def plots(self, recipe: Recipe, out: Path) -> list[str]:
        plot_genome(recipe, out / "genome.png")
        return ["genome.png"]


class ResidentCandidate:
    """Resident sources and one eval model written in place (docs/ARCHITECTURE.md, "Where a
    worker keeps its weights")."""

    def __init__(self, config: SearchConfig, device: str):
        from evomerge.fitness.models import empty_model, load_tokenizer
        from evomerge.merge.io.checkpoint import Checkpoint
        from evomerge.merge.placement import tied_head
        from evomerge.merge.resident import ResidentSources

        paths = config.model_paths()
        base = Checkpoint(paths[config.base], label=f"models.{config.base}")
        placement = Placement(
            worker_devices(device, config.workers.gpus_per_worker),
            base.info.num_layers,
            tied=tied_head(base.info, base.names),
        )
        where = config.workers.sources
        if where == "auto" and placement.devices == ("cpu",):
            where = "device"  # host memory is the device's: nothing to choose
        elif where == "auto":
            from evomerge.search.memory import choose_sources

            where = choose_sources(config, gpu_memory(placement.devices[0]))
        self.sources = ResidentSources(paths, config.base, placement, where)
        self.model = empty_model(paths[config.base], config.merge_dtype, placement)
        self.tokenizer = load_tokenizer(paths[config.base])

    def materialize(self, recipe: Recipe) -> None:
        self.sources.materialize(recipe, self.model)


class EngineCandidate:
    """The vLLM backend's worker side: resident sources, `merge_stream` into one engine in
    place, no eval model (docs/ARCHITECTURE.md, "The vLLM backend"). On one GPU the merge runs
    there (sources on it only for `device`: auto leaves the GPU to the engine); over several,
    on the CPU, each rank loading its shard."""

    model: Any = None  # the engine holds the candidate's weights

    def __init__(self, config: SearchConfig, device: str):
        from evomerge.fitness.models import load_tokenizer
        from evomerge.fitness.vllm_backend import Engine
        from evomerge.merge.io.checkpoint import Checkpoint
        from evomerge.merge.placement import tied_head
        from evomerge.merge.resident import ResidentSources, Where

        paths = config.model_paths()
        base = Checkpoint(paths[config.base], label=f"models.{config.base}")
        wc = config.workers
        ranks = wc.gpus_per_worker if device == "cuda" else 1
        if device == "cuda":
            worker_devices(device, ranks)  # refuses a worker seeing fewer GPUs, in one line
        self.device = "cuda:0" if device == "cuda" and ranks == 1 else "cpu"
        where: Where = "device" if self.device == "cpu" or wc.sources == "device" else "host"
        tied = tied_head(base.info, base.names)
        placement = Placement((self.device,), base.info.num_layers, tied=tied)
        self.sources = ResidentSources(paths, config.base, placement, where)
        self.tokenizer = load_tokenizer(paths[config.base])
        self.engine = Engine(
            paths[config.base],
            config.merge_dtype,
            "cuda" if device == "cuda" else "cpu",
            tensor_parallel=ranks,
            max_num_seqs=config.fitness.batch_size,
            longest=sum(config.scorer().longest_request(self.tokenizer, config.scored_items())),
            seed=config.cma.seed,
        )

    def lm(self, batch_size: int):
        """The lm-eval LM answering the Scorer's requests with this engine."""
        from evomerge.fitness.vllm_backend import engine_lm

        return engine_lm(self.engine, self.tokenizer, batch_size)

    def materialize(self, recipe: Recipe) -> None:
        from evomerge.merge.engine import merge_stream

        if self.engine.dead is not None:
            self._replace_engine()
        stream = merge_stream(
            recipe,
            self.sources.models,
            self.device,
            workers=self.sources.workers,
            read_ahead=self.sources.where == "host",
        )
        self.engine.write((job.name, tensor) for job, tensor in stream)

    def _replace_engine(self) -> None:
        """The engine died in the last trial. A Ray worker exits to be replaced, as any dead
        worker is (a process whose GPU context a CUDA error poisoned could start no engine
        again); outside Ray nobody would replace it, so the engine restarts in place."""
        import sys

        from evomerge.fitness.vllm_backend import ENGINE_DEAD_EXIT

        ray = sys.modules.get("ray")  # not imported: not in Ray
        if ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id():
            print(
                f"evomerge: {self.engine.dead}; this worker exits to be replaced",
                file=sys.stderr,
                flush=True,
            )
            os._exit(ENGINE_DEAD_EXIT)
        self.engine.restart()


def worker_devices(device: str, gpus: int) -> tuple[str, ...]:
    """The devices of a worker: the CPU, or its first `gpus` CUDA devices (a Ray actor given N
    GPUs sees exactly those, as cuda:0 .. cuda:N-1)."""
    if device != "cuda":  # the CPU, or one named GPU
        return (device,)
    visible = torch.cuda.device_count()
    if visible < gpus:
        raise EvomergeError(
            f"workers.gpus_per_worker: {gpus}, but this worker sees {visible} GPU(s); lower it "
            "or give workers more GPUs"
        )
    return tuple(f"cuda:{i}" for i in range(gpus))


def gpu_memory(device: str) -> int | None:
    """Total bytes of a CUDA device (None for the CPU)."""
    if not device.startswith("cuda"):
        return None
    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)


def plot_genome(recipe: Recipe, path: Path) -> None:
    """One heat map per model parameter of the method: models x layer groups."""
    plt = pyplot()
    ps = recipe.parameter_space
    assert ps is not None
    labels = [g.label() for g in ps.groups]
    models = list(dict.fromkeys(a for g in ps.groups for a in ps.merged_models(g)))
    fields = [p.name for p in ps.merge_method.model_params] or ["weight"]
    fig, axes = plt.subplots(
        1,
        len(fields),
        figsize=(max(6, 0.6 * len(labels) + 3) * len(fields) / 1.5, 0.5 * len(models) + 2),
        squeeze=False,
    )
    for ax, field in zip(axes[0], fields, strict=True):
        grid = [
            [
                ps.model_values(g, m).get(field, float("nan")) if m in g.params else float("nan")
                for g in ps.groups
            ]
            for m in models
        ]
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(models)), models)
        ax.set_title(field)
        fig.colorbar(im, ax=ax)
    save(fig, path)
