"""The search config (YAML): what to merge, which parameters are genes, how to score and search.

Every field has a default a small search can live with; `evomerge search --help` and
configs/demo.yaml document them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.fitness.tasks import TaskSpec
from evomerge.merge.errors import EvomergeError, schema_problems
from evomerge.merge.io.files import read_yaml
from evomerge.merge.ops.registry import METHODS, get_method
from evomerge.merge.recipe import DType, MethodName, ModelRef


class _Strict(BaseModel):
    # NaN or inf is never a meaningful setting (a NaN penalty would poison the optimizer)
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )


class GeneRange(_Strict):
    """Bounds, start and transform of one kind of gene (e.g. every model's weight)."""

    low: float
    high: float
    init: float
    transform: Literal["clip", "sigmoid"] = "clip"  # clip: x is the value; sigmoid: squashed

    @model_validator(mode="after")
    def _order(self) -> GeneRange:
        if not self.low < self.high:
            raise ValueError(f"need low < high, got {self.low} >= {self.high}")
        if not self.low <= self.init <= self.high:
            raise ValueError(f"init {self.init} is outside [{self.low}, {self.high}]")
        return self


class MergeSpace(_Strict):
    """The parameter space being searched. Which parameters exist, their valid values and their
    default gene ranges come from the merge method's declaration (merge.ops.registry)."""

    method: MethodName = "ties"
    layers_per_group: int = Field(1, ge=1)  # genes per group of N consecutive layers
    embed_head_groups: bool = True  # embeddings and head get genes of their own
    tensor_kinds: bool = False  # attention / mlp / other get separate genes
    genes: list[str] | None = None  # default: the parameters the method searches by default
    ranges: dict[str, GeneRange] = Field(default_factory=dict)  # overrides of the default ranges
    init: dict[str, dict[str, float]] = Field(
        default_factory=dict
    )  # per model, e.g. {next: {weight: 0}}
    fixed: dict[str, float] = Field(default_factory=dict)  # parameters that are not genes
    normalize: bool | None = None
    # the candidate's dtype; auto: the checkpoints' own (the base's floating dtype), so bf16
    # sources give a bf16 candidate (SearchConfig.merge_dtype resolves it)
    dtype: Literal["auto"] | DType = "auto"
    # random methods' masks (merge.ops.masks): counter draws, computed per chunk where the tensor
    # is; torch, the sequential CPU generator (runs started before counter masks keep it)
    masks: Literal["torch", "counter"] = "counter"

    @model_validator(mode="before")
    @classmethod
    def _legacy_lambda(cls, data: object) -> object:
        """`lambda: x` (run directories before 0.2 store it) is `fixed: {lambda: x}`."""
        if isinstance(data, dict) and "lambda" in data:
            data = dict(data)
            value = data.pop("lambda")
            method = data.get("method", "ties")
            if method in METHODS and "lambda" in METHODS[method].param_names:
                data["fixed"] = {"lambda": value, **(data.get("fixed") or {})}
        return data

    @model_validator(mode="after")
    def _declared(self) -> MergeSpace:
        method = get_method(self.method)
        named = [
            *(("genes", g) for g in self.genes or []),
            *((f"ranges.{g}", g) for g in self.ranges),
            *((f"fixed.{g}", g) for g in self.fixed),
            *((f"init.{m}.{g}", g) for m, values in self.init.items() for g in values),
        ]
        for where, name in named:
            if name not in method.param_names:
                raise ValueError(
                    f"{where}: {name!r} is not a parameter of {self.method} "
                    f"(its parameters: {', '.join(method.param_names) or 'none'})"
                )
        if self.normalize is not None and "normalize" not in method.options:
            raise ValueError(f"normalize: {self.method} does not read it; remove it")
        for name, value in self.fixed.items():
            if (problem := method.param(name).problem(value)) is not None:
                raise ValueError(f"fixed.{name}: {problem}")
        for name in self.gene_names():
            if name in self.fixed:
                raise ValueError(f"genes: {name!r} is also fixed; drop it from one of them")
            param = method.param(name)
            if name not in self.ranges and param.search is None:
                raise ValueError(f"genes: {name!r} has no default range; set ranges.{name}")
            r = self.range(name)
            for end in (r.low, r.high):
                if r.transform == "clip" and (problem := param.problem(end)) is not None:
                    raise ValueError(f"ranges.{name}: {name} {problem} (a gene stays valid)")
        for model, values in self.init.items():
            for name, value in values.items():
                if name not in self.gene_names():
                    raise ValueError(f"init.{model}.{name}: {name!r} is not a gene")
                span = self.range(name)
                if not span.low <= value <= span.high:
                    raise ValueError(
                        f"init.{model}.{name}: {value} is outside [{span.low}, {span.high}]"
                    )
        return self

    def gene_names(self) -> list[str]:
        if self.genes is not None:
            return self.genes
        method = get_method(self.method)
        return [
            p.name
            for p in (*method.group_params, *method.model_params)
            if p.search is not None and p.searched_by_default and p.name not in self.fixed
        ]

    def range(self, gene: str) -> GeneRange:
        if gene in self.ranges:
            return self.ranges[gene]
        search = get_method(self.method).param(gene).search
        assert search is not None, gene
        low, high, init = search
        return GeneRange(low=low, high=high, init=init)

    def start(self, model: str | None, gene: str) -> float:
        """A gene's initial value: the model's `init` when given, else its range's."""
        return self.init.get(model or "", {}).get(gene, self.range(gene).init)


class DFSConfig(_Strict):
    """Data-flow space: which layers the hidden state passes through, and its scale per move."""

    models: list[str]  # whose layers form the slots, model by model; "ps" = the PS stage result
    embed_from: str  # supplies embeddings, final norm and head (and the path's first/last layer)
    repeats: int = Field(3, ge=1)  # slots = all layers of `models`, repeated this many times
    scales: Literal["matrix", "model_pair", "none"] = "model_pair"
    scale_range: GeneRange = GeneRange(low=-0.5, high=0.5, init=0.0)  # scale = 1 + gene > 0
    min_hops: int = Field(1, ge=1)
    max_hops: int | None = None  # a candidate outside [min_hops, max_hops] is FAILED
    ps_recipe: str | None = None  # PS+DFS: a recipe file or a run directory (its best recipe)

    @field_validator("scale_range")
    @classmethod
    def _positive(cls, v: GeneRange) -> GeneRange:
        if v.low <= -1:
            raise ValueError("low must be > -1: scales (1 + gene) must stay positive")
        return v


class RescoreConfig(_Strict):
    """After the budget, the best candidates are scored again on more search items and the
    winner is the best of that second score: the maximum of many noisy scores on the same
    items overrates its candidate (the winner's curse). Held-out items are never used."""

    top: int = Field(5, ge=0)  # how many of the best by search fitness; 0: off
    limit: int | float | None = None  # items per task (count or fraction); None: every item

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | float | None) -> int | float | None:
        return _check_limit(v)


def _check_limit(v: int | float | None) -> int | float | None:
    if v is not None and not (v >= 1 if isinstance(v, int) else 0 < v <= 1):
        raise ValueError(f"must be a count >= 1 or a fraction in (0, 1], got {v}")
    return v


class RacingConfig(_Strict):
    """Racing (search/loop/racing.py): each candidate's items are scored in seeded chunks, and a
    candidate stops once its rank among the generation's best (the ranks CMA-ES uses) is
    decided. Off, every candidate is scored on every item.

    Off by default. Measured (experiments/bench_racing.py, the demo, 6 seeds, same budget) it
    scores 0.45 of full evaluation's items at no measurable loss: the winners' held-out mean
    0.565 with racing, 0.560 without (0.551 and 0.565 on the 3 seeds its defaults were not
    chosen on). It stays opt-in because it is not a pure speed-up: its decisions
    hold at a confidence, it switches active CMA off (a different optimizer), it needs every
    task's metric to be a mean of per-item scores (a corpus metric stops the search), and a run
    journaled before this setting existed must resume as it started, with every item scored.
    For exact-match and accuracy tasks, `racing: true` is the recommended setting."""

    enabled: bool = False
    # each comparison's bound holds with this probability (split over the tasks); 1: only the
    # hard bound (unscored items could be anything), and racing decides as full evaluation
    confidence: float = Field(0.9, gt=0, le=1)
    # differences below this many standard errors of full evaluation's own estimate of them
    # are not worth resolving; 0: resolve every difference
    tolerance: float = Field(5.0, ge=0)
    first_chunk: float = Field(0.1, gt=0, le=1)  # the first chunk's share of every task's items
    chunks: int = Field(10, ge=1)  # chunks in all: the rest of the items in equal parts
    # chunk boundaries in whole batches (fitness.batch_size): a partial batch costs a whole
    # one's time (runs started before this setting keep the unrounded chunks)
    whole_batches: bool = True

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, data: object) -> object:
        """`racing: true` is `racing: {enabled: true}`."""
        return {"enabled": data} if isinstance(data, bool) else data


class FitnessConfig(_Strict):
    tasks: list[TaskSpec] = Field(min_length=1)
    # what answers lm-eval's requests: hf, the candidate as a transformers model in the worker
    # (lm-eval's HFLM); vllm, one vLLM engine per worker that every candidate is written into
    # (fitness/vllm_backend.py; `pip install 'evomerge[vllm]'`). Same requests, same greedy
    # settings, same per-item scores; vllm pays off on GPUs and models large enough for its
    # batching to win (README, "Fitness backends")
    backend: Literal["hf", "vllm"] = "hf"
    include: list[str] = Field(default_factory=list)  # extra lm-eval task directories
    limit: int | float | None = None  # items per task: a count, or a fraction <= 1
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(64, ge=1)
    apply_chat_template: bool = False
    # held-out tasks; default: the search tasks with _search -> _heldout
    heldout_tasks: list[TaskSpec] | None = None
    # split a candidate's examples over workers that would idle: auto (a generation's tail,
    # search/loop/schedule.py's Split), off, or a fixed number of shards; only mean-aggregated
    # metrics are sharded. Under racing it splits each chunk into pieces the same way
    shards: Literal["auto", "off"] | int = "auto"
    rescore: RescoreConfig = Field(default_factory=RescoreConfig)
    racing: RacingConfig = Field(default_factory=RacingConfig)

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | float | None) -> int | float | None:
        return _check_limit(v)

    @field_validator("shards")
    @classmethod
    def _shards(cls, v: str | int) -> str | int:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be auto, off or a count >= 1, got {v}")
        return v


class CMAConfig(_Strict):
    # cmaes: the search; random: uniform samples in the genome's bounds at the same budget and
    # population, the baseline CMA-ES must beat
    sampler: Literal["cmaes", "random"] = "cmaes"
    sigma0: float = Field(0.2, gt=0)
    popsize: int | None = Field(None, ge=2)  # None: cma's default 4 + 3 ln(n)
    budget: int = Field(64, ge=1)  # evaluations in all
    seed: int = 0
    diagonal_above: int = Field(400, ge=0)  # separable CMA-ES above this genome size
    # active CMA (negative weights for the worst candidates); default: on, off under racing
    active: bool | None = None


class WorkerConfig(_Strict):
    count: int | None = Field(None, ge=0)  # None: one per GPU, else per CPU slot; 0: serial
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: one worker per GPU, else per CPU slot
    cpus_per_worker: int = Field(1, ge=1)
    address: str | None = None  # attach to a running Ray cluster (e.g. "auto" or "ray://h:10001")
    trial_timeout: float = Field(900.0, gt=0)  # seconds; a slower trial is FAILED, worker replaced
    start_timeout: float = Field(1800.0, gt=0)  # seconds a worker may take to load; then replaced
    object_store_mb: int = 256
    # where a worker keeps the source models: on its GPU(s) (device), in pinned host memory,
    # streamed to the GPU tensor by tensor as each candidate is merged (host), or whichever the
    # memory plan fits (auto: device when it fits, else host)
    sources: Literal["auto", "device", "host"] = "auto"
    # GPUs per worker: the candidate's layers are split over them (as accelerate's device maps
    # do), each GPU holding the sources of the layers it serves
    gpus_per_worker: int = Field(1, ge=1)
    # memory per GPU and per host (node) when the driver cannot see them (a remote cluster),
    # e.g. "80GB"; the memory plan checks against these (search/memory.py)
    gpu_memory: str | None = None
    host_memory: str | None = None

    @field_validator("gpu_memory", "host_memory")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None:
            from evomerge.merge.engine import parse_size

            try:
                parse_size(v)
            except EvomergeError:
                raise ValueError(f"{v!r}: use a size like 80GB or 141GiB") from None
        return v


class SearchConfig(_Strict):
    name: str = "search"
    zoo: Literal["tiny", "demo"] | None = None  # relative model paths resolve inside this zoo
    models: dict[str, ModelRef]
    base: str
    space: MergeSpace = Field(default_factory=MergeSpace)
    dfs: DFSConfig | None = None  # set: a data-flow search (over a PS result with dfs.ps_recipe)
    fitness: FitnessConfig
    cma: CMAConfig = Field(default_factory=CMAConfig)
    workers: WorkerConfig = Field(default_factory=WorkerConfig)
    penalty: float = -1.0  # fitness given to FAILED trials (below any real objective)
    # where hub models are downloaded and read (None: the Hugging Face cache, HF_HOME); on a
    # cluster, shared storage every node reads
    cache_dir: str | None = None
    # experiment trackers, as Hugging Face Trainer's report_to: none, tensorboard, mlflow,
    # wandb, or a list (search/watch/trackers.py); where a search is watched, not what it decides
    report_to: list[str] = Field(default_factory=list)

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v: object) -> list[str]:
        return parse_report_to(v)

    @model_validator(mode="after")
    def _aliases(self) -> SearchConfig:
        if self.base not in self.models:
            raise ValueError(f"base {self.base!r} is not in models ({', '.join(self.models)})")
        if len(self.models) < 2 and self.dfs is None:
            raise ValueError("models: need a base and at least one model to merge")
        for alias in self.space.init:
            if alias not in self.models:
                raise ValueError(f"space.init: {alias!r} is not in models")
        if self.fitness.racing.enabled and self.cma.active:
            raise ValueError(
                "cma.active: racing decides only the best half's ranks, which active CMA's "
                "negative weights would also read; leave cma.active unset (off under racing)"
            )
        if self.dfs is not None and self.fitness.backend == "vllm":
            raise ValueError(
                "fitness.backend: vllm scores parameter-space searches; a data-flow path "
                "rewires the model's layers per candidate, which a vLLM engine cannot: use hf"
            )
        if self.dfs is not None:
            # "ps": the parameter-space stage, fixed (dfs.ps_recipe) or searched with the path
            for alias in [*self.dfs.models, self.dfs.embed_from]:
                if alias not in {*self.models, "ps"}:
                    raise ValueError(f"dfs: {alias!r} is not in models (or ps)")
        return self

    def ps_recipe(self):
        """The PS stage of a PS+DFS search, from a recipe file or a run's best recipe."""
        from evomerge.merge.recipe import Recipe

        assert self.dfs is not None and self.dfs.ps_recipe is not None
        path = Path(self.dfs.ps_recipe).expanduser()
        if path.is_dir():
            path = path / "best" / "recipe.yaml"
        if not path.is_file():
            raise EvomergeError(
                f"dfs.ps_recipe: {path} not found; finish the PS search first "
                "(e.g. `make demo`) or point at a recipe file"
            )
        recipe = Recipe.load(path)
        if recipe.parameter_space is None:
            raise EvomergeError(f"dfs.ps_recipe: {path} has no parameter_space stage")
        return recipe

    @property
    def merge_dtype(self) -> str:
        """The candidate's dtype: space.dtype, or for auto the base checkpoint's floating dtype
        (the one most of its bytes are stored in), read from its header."""
        if self.space.dtype != "auto":
            return self.space.dtype
        from evomerge.merge.io.checkpoint import Checkpoint

        return stored_dtype(Checkpoint(self.model_path(self.base), label=f"models.{self.base}"))

    @property
    def experts(self) -> list[str]:
        return [a for a in self.models if a != self.base]

    def zoo_dir(self) -> Path | None:
        if self.zoo is None:
            return None
        from evomerge.fitness.zoo.build import default_zoo_dir

        return default_zoo_dir(self.zoo)

    def model_path(self, alias: str) -> Path:
        return self._resolved(alias).local

    def model_paths(self) -> dict[str, Path]:
        """Every model's directory: relative paths inside the zoo, hub IDs resolved to their
        cache snapshot (downloaded the first time, on the process that asks: the driver)."""
        return {a: self._resolved(a).local for a in self.models}

    def model_refs(self) -> dict[str, str]:
        """Every model's reference as recipes record it: a hub ID at its commit, or the
        absolute local path."""
        return {a: self._resolved(a).pinned for a in self.models}

    def pinned(self) -> SearchConfig:
        """This config with every model reference pinned (hub IDs at their commits)."""
        models = {a: ModelRef(path=ref) for a, ref in self.model_refs().items()}
        return self.model_copy(update={"models": models})

    def _resolved(self, alias: str):
        from evomerge.merge.io import hub

        ref = self.models[alias].path
        zoo = self.zoo_dir()
        if zoo is not None and not Path(ref).expanduser().is_absolute():
            local = zoo / ref  # zoo-relative, never a hub ID
            return hub.Resolved(local, str(local))
        hub.use_cache(self.cache_dir)
        return hub.resolve(ref, label=f"models.{alias}")

    def heldout_specs(self) -> list[TaskSpec]:
        """The held-out objective: fitness.heldout_tasks, else the search tasks on their held-out
        side (a task's `holdout` part, or the zoo's `_heldout` twin). Score it with
        `Scorer(..., part="heldout")`."""
        from evomerge.fitness.tasks import to_split

        return self.fitness.heldout_tasks or to_split(self.fitness.tasks, "heldout")

    def scored_items(self) -> str:
        """The widest item set a worker scores (Scorer's `which`): the rescoring items, a
        superset of the search's, when the best are rescored."""
        return "rescore" if self.fitness.rescore.top > 0 else "search"

    def scorer(self, specs: list[TaskSpec] | None = None, part: str = "search"):
        """The Scorer of these tasks (default: the search's) as a worker builds it: the driver's
        checks and memory plan measure the very requests the workers will answer."""
        from evomerge.fitness.scorer import Scorer

        fc = self.fitness
        return Scorer(
            fc.tasks if specs is None else specs,
            include_paths=self.include_paths(),
            limit=fc.limit,
            seed=self.cma.seed,
            num_fewshot=fc.num_fewshot,
            batch_size=fc.batch_size,
            apply_chat_template=fc.apply_chat_template,
            rescore_limit=fc.rescore.limit,
            part=part,
        )

    def include_paths(self) -> list[Path]:
        paths = [Path(p) for p in self.fitness.include]
        zoo = self.zoo_dir()
        return paths + ([zoo / "tasks"] if zoo is not None else [])

    def decisions(self) -> dict:
        """The fields that decide what the search does; worker resources, the cache location
        and the trackers may change on resume."""
        where = ("workers", "cache_dir", "report_to")
        out = {k: v for k, v in self.dump().items() if k not in where}
        # auto is what it resolves to: a run started when float32 was the default, on float32
        # checkpoints, resumes under a config that leaves dtype unset
        out["space"] = {**out["space"], "dtype": self.merge_dtype}
        return out

    def digest(self) -> str:
        text = json.dumps(self.decisions(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def dump(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def load(cls, path: Path | str) -> SearchConfig:
        return cls.parse(read_yaml(Path(path), "config"), str(path))

    @classmethod
    def parse(cls, data: object, source: str = "config") -> SearchConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise EvomergeError(schema_problems(e, source)) from None


def stored_dtype(ckpt) -> str:
    """The floating dtype that most of a checkpoint's bytes are stored in (float32, bfloat16
    or float16; another one, e.g. float64 or an fp8 format, gives float32)."""
    import collections
    import math

    nbytes: collections.Counter[str] = collections.Counter()
    for name in ckpt.names:
        dt = ckpt.dtype(name)
        if dt.is_floating_point:
            nbytes[str(dt).removeprefix("torch.")] += dt.itemsize * math.prod(ckpt.shape(name))
    if not nbytes:
        return "float32"
    top = nbytes.most_common(1)[0][0]
    return top if top in ("float32", "bfloat16", "float16") else "float32"


TRACKERS = ("tensorboard", "mlflow", "wandb")


def parse_report_to(value: object) -> list[str]:
    """`none`, a tracker, a comma-separated string or a list of them -> tracker names, in order,
    without repeats. Raises ValueError naming the choices."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"{value!r}: give none, a tracker or a list of them")
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if name in ("", "none"):
            continue
        if name not in TRACKERS:
            raise ValueError(f"{item!r} is not a tracker; choose from none, {', '.join(TRACKERS)}")
        if name not in names:
            names.append(name)
    return names


def changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the fields that differ between two config dumps."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out
