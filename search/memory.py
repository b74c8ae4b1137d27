"""The memory plan: what a worker holds on each of its GPUs and in host memory, from the
checkpoints' headers and the tasks' longest request, computed before any worker starts
(docs/ARCHITECTURE.md, "Memory plan").

A worker that runs out of memory at start-up dies with a bare CUDA error after reading tens of
GB; the plan refuses such a config at once. The parts are summed, a bound: merge temporaries
and scoring buffers are not alive at once, but the caching allocator keeps what the merge
freed. CPU workers hold everything in host memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from evomerge.merge.errors import EvomergeError
from evomerge.search.config import SearchConfig

Sources = Literal["device", "host"]

GPU_RESERVE = 2**30  # CUDA context (~0.5 GB) and the caching allocator's fragmentation
DEFAULT_SEQUENCE = 2048  # lm-eval's default context length, when the tasks' own is not known
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# the order parts are listed in (the table's columns)
PARTS = (
    "sources",
    "sources window",
    "candidate",
    "vLLM weights",
    "merge temporaries",
    "vLLM reload buffer",
    "vLLM write batches",
    "KV cache",
    "vLLM KV cache",
    "logits",
    "vLLM activations",
    "vLLM CUDA graphs",
    "reserve",
)
# vLLM's CUDA graphs (a CUDA engine is not eager) and its workspaces, per GPU: vLLM reports
# a few hundred MB to ~1 GB for graphs captured up to max_num_seqs; not measured here
VLLM_GRAPHS = 2**30
HOST = "host"
NODE_GPUS = 8  # GPUs of a node, where the driver sees none (a fix never spans more)


@dataclass(frozen=True)
class SequenceLength:
    """The tokens one scored sequence may hold (input plus generated), and where that came from."""

    tokens: int
    note: str
    measured: bool = False  # from the tasks' own requests

    @classmethod
    def default(cls, why: str) -> SequenceLength:
        return cls(DEFAULT_SEQUENCE, f"{DEFAULT_SEQUENCE} (default: {why})")

    @classmethod
    def of_tasks(cls, longest_input: int, generated: int) -> SequenceLength:
        return cls(
            longest_input + generated,
            f"{longest_input + generated} (the tasks' longest request: {longest_input} input "
            f"+ {generated} generated tokens)",
            measured=True,
        )


@dataclass(frozen=True)
class Capacity:
    """What a worker's plan is checked against: bytes per GPU and per node, each with where the
    number came from (or why there is none)."""

    gpu: int | None
    gpu_from: str
    host: int | None
    host_from: str
    gpus_visible: int | None = None  # GPUs on this machine, when the workers run here

    @classmethod
    def detect(cls, config: SearchConfig) -> Capacity:
        """The GPUs the driver sees (when the workers run here), else workers.gpu_memory; the
        host's MemTotal (when the workers run here), else workers.host_memory."""
        from evomerge.merge.engine import parse_size

        wc = config.workers
        gpu, gpu_from, visible = None, "not checked (no GPU visible, no workers.gpu_memory)", None
        if wc.device != "cpu" and wc.address is None and _cuda_available():
            import torch

            visible = torch.cuda.device_count()
            props = [torch.cuda.get_device_properties(i) for i in range(visible)]
            i = min(range(visible), key=lambda k: props[k].total_memory)
            gpu = int(props[i].total_memory)
            gpu_from = f"cuda:{i}, {props[i].name}" + (
                f", the smallest of {visible}" * (visible > 1)
            )
        elif wc.gpu_memory is not None:
            gpu, gpu_from = parse_size(wc.gpu_memory), "workers.gpu_memory"
        host, host_from = None, "not checked (a remote cluster: declare workers.host_memory)"
        if wc.host_memory is not None:
            host, host_from = parse_size(wc.host_memory), "workers.host_memory"
        elif wc.address is None and (total := mem_total()) is not None:
            host, host_from = total, "MemTotal of this machine"
        return cls(gpu, gpu_from, host, host_from, visible)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def mem_total() -> int | None:
    """This machine's memory in bytes (/proc/meminfo MemTotal), or None where it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class Layout:
    """What the plan reads of the models: every tensor's size, from the headers alone."""

    names: tuple[str, ...]  # the base's tensors, in network order
    numel: Mapping[str, int]
    floating: Mapping[str, bool]
    stored: Mapping[str, Mapping[str, int]]  # alias -> tensor -> bytes as stored
    num_layers: int
    tied: bool  # the head is the embedding (no head tensor in the file)
    vocab: int
    kv_width: int  # elements of K and V per token and layer
    max_length: int  # the model's context: no sequence is longer
    kind: Literal["parameter space", "data flow", "parameter space + data flow"]
    path: tuple[str, ...] = ()  # data flow: the models its path loads whole (not the stage)
    stage: Literal["none", "fixed", "searched"] = "none"
    stage_dtype: str = "float32"  # a fixed stage: its recipe's dtype
    hops: int = 0  # data flow: the most hops (layers) a path runs
    # the method merges a chunk at a time off a CPU (fused.chunked_into): its fp32 temporaries
    # are those of one chunk, not of the device's largest tensor
    chunked: bool = False
    # what a vLLM engine's plan reads besides: which tensors are matrices (sharded over
    # tensor-parallel ranks; vectors such as norms are replicated), the widths its activations
    # take, and its max_model_len (vllm_backend.engine_length of the config)
    matrix: Mapping[str, bool] = field(default_factory=dict)
    hidden: int = 0
    intermediate: int = 0
    engine_length: int = DEFAULT_SEQUENCE

    @classmethod
    def read(cls, config: SearchConfig) -> Layout:
        from evomerge.merge.architecture import classify
        from evomerge.merge.io.checkpoint import Checkpoint
        from evomerge.merge.ops.registry import chunkable, get_method
        from evomerge.merge.placement import tied_head

        ckpts = {a: Checkpoint(p, label=f"models.{a}") for a, p in config.model_paths().items()}
        base = ckpts[config.base]
        names = tuple(base.names)
        numel = {n: math.prod(base.shape(n)) for n in names}
        stored = {
            a: {n: math.prod(c.shape(n)) * c.dtype(n).itemsize for n in c.names}
            for a, c in ckpts.items()
        }
        info = base.info
        has_head = any(_group(classify, n) == "head" for n in names)
        text = info.raw.get("text_config", info.raw)
        embed = next((n for n in names if _group(classify, n) == "embed"), None)
        vocab = info.vocab_size or (base.shape(embed)[0] if embed else 0)
        extra: dict = {"kind": "parameter space"}
        if config.dfs is not None:
            extra = _data_flow(config)
        return cls(
            names=names,
            numel=numel,
            floating={n: base.dtype(n).is_floating_point for n in names},
            stored=stored,
            num_layers=info.num_layers,
            tied=tied_head(info, names) and not has_head,
            vocab=int(vocab),
            kv_width=_kv_width(text),
            max_length=_max_length(text),
            chunked=chunkable(get_method(config.space.method), masks=config.space.masks),
            matrix={n: len(base.shape(n)) >= 2 for n in names},
            hidden=int(text.get("hidden_size") or text.get("n_embd") or 0),
            intermediate=int(text.get("intermediate_size") or text.get("n_inner") or 0),
            engine_length=_engine_length(text),
            **extra,
        )


def _group(classify, name: str) -> str | None:
    try:
        return classify(name).group
    except EvomergeError:
        return None


def _kv_width(text: dict) -> int:
    """K and V elements per token and layer: 2 x KV heads x head dim (GQA: fewer KV heads)."""
    heads = text.get("num_attention_heads") or text.get("n_head")
    hidden = text.get("hidden_size") or text.get("n_embd") or 0
    if not heads:
        return 2 * int(hidden)  # no head count: one K and one V as wide as the hidden state
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or int(hidden) // int(heads)
    return 2 * int(kv_heads) * int(head_dim)


def _engine_tokens(layout: Layout, s: Setting) -> int:
    """The engine's max_model_len for the measured sequence, as the worker computes it."""
    from evomerge.fitness.vllm_backend import engine_length  # imports no vLLM

    return engine_length({"max_position_embeddings": layout.engine_length}, s.tokens)


def _engine_length(text: dict) -> int:
    from evomerge.fitness.vllm_backend import engine_length  # imports no vLLM

    return engine_length(text)


def _max_length(text: dict) -> int:
    """The model's context length as lm-eval's HFLM resolves it from the config (its default
    when the config has none)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(text.get(key), int) and text[key] > 0:
            return int(text[key])
    return DEFAULT_SEQUENCE


def _data_flow(config: SearchConfig) -> dict:
    """What a data-flow search loads: its path's models (whole), its stage, its longest path.
    Read from the config and config.json files, as spaces/data_flow_space.py lays the path out
    (not imported: the spaces are a layer above)."""
    from evomerge.merge.architecture import ModelInfo
    from evomerge.merge.recipe import PS

    dfs = config.dfs
    assert dfs is not None
    used = [*dict.fromkeys([*dfs.models, dfs.embed_from])]
    stage: Literal["none", "fixed", "searched"] = "none"
    stage_dtype = "float32"
    stage_dir = config.model_path(config.base)
    if PS in used:
        stage = "fixed" if dfs.ps_recipe else "searched"
        if dfs.ps_recipe:
            recipe = config.ps_recipe()
            stage_dtype, stage_dir = recipe.dtype, recipe.models[recipe.main_alias].local()

    def layers(alias: str) -> int:
        return ModelInfo.from_dir(stage_dir if alias == PS else config.model_path(alias)).num_layers

    # every layer of the path's models, `repeats` times, plus the embedding model's first and
    # last layers, which a path always runs
    hops = dfs.repeats * sum(layers(a) for a in dfs.models) + 2
    if dfs.max_hops is not None:
        hops = min(hops, dfs.max_hops)
    return {
        "kind": "data flow" if stage == "none" else "parameter space + data flow",
        "path": tuple(a for a in used if a != PS),
        "stage": stage,
        "stage_dtype": stage_dtype,
        "hops": hops,
    }


@dataclass(frozen=True)
class Setting:
    """The settings a plan depends on: what a fix changes."""

    gpus: int  # per worker; 0: a CPU worker
    sources: Sources
    batch: int
    tokens: int  # per sequence, capped at the model's context
    dtype: str  # the candidate's (merge) dtype
    backend: str = "hf"  # fitness.backend
    # vllm: the tokens one engine step prefills (vLLM's default max_num_batched_tokens)
    batched_tokens: int = 0


@dataclass(frozen=True)
class Row:
    part: str  # one of PARTS
    where: str  # a worker's device ("cuda:0", ..., "cpu") or "host"
    nbytes: int


def _rows(layout: Layout, s: Setting, aliases: tuple[str, ...]) -> list[Row]:
    """Every part on every device of one worker (`aliases`: the models merged, base first)."""
    from evomerge.merge.engine import READ_AHEAD
    from evomerge.merge.ops.fused import GPU_CHUNK
    from evomerge.merge.placement import Placement

    if s.backend == "vllm" and layout.kind == "parameter space":
        return _engine_rows(layout, s, aliases)
    devices = _devices(s)
    gpu = s.gpus > 0
    first = devices[0]
    item = _ITEMSIZE[s.dtype]
    out: dict[tuple[str, str], int] = defaultdict(int)

    def whole(alias: str, dtype: str) -> int:
        """A model loaded whole in `dtype` (integer tensors as stored)."""
        size = _ITEMSIZE[dtype]
        return sum(
            layout.numel[n] * size if layout.floating[n] else layout.stored[alias][n]
            for n in layout.names
        )

    placement = Placement(devices, layout.num_layers, layout.tied)
    kv_layers: dict[str, int] = {}
    if layout.kind == "parameter space" or layout.stage == "searched":
        on: dict[str, list[str]] = defaultdict(list)
        for n in layout.names:
            on[placement.device_of(n)].append(n)
        for d, names in on.items():
            for n in names:
                size = (
                    layout.numel[n] * item if layout.floating[n] else layout.stored[aliases[0]][n]
                )
                out["candidate", d] += size
                for a in aliases:
                    out["sources", d if s.sources == "device" or not gpu else HOST] += (
                        layout.stored[a][n]
                    )
            # the GPU merge path: a tensor's inputs and two more in fp32, whole or a chunk's
            largest = max(layout.numel[n] for n in names)
            entries = min(largest, GPU_CHUNK) if layout.chunked else largest
            out["merge temporaries", d] += (len(aliases) + 2) * entries * 4
            if gpu and s.sources == "host":  # read ahead, plus the tensor being merged
                inputs = max(sum(layout.stored[a][n] for a in aliases) for n in names)
                out["sources window", d] += READ_AHEAD + inputs
        kv_layers = {
            d: sum(1 for i in range(layout.num_layers) if placement.layer_device(i) == d)
            for d in devices
        }
    head = placement.device_of("lm_head.weight")
    if layout.kind != "parameter space":
        for a in layout.path:  # loaded whole, as HF models, on the worker's first device
            out["sources", first] += whole(a, s.dtype)
        if layout.stage == "fixed":  # the stage's merge, built once (sized as the base)
            out["candidate", first] += whole(aliases[0], layout.stage_dtype)
        kv_layers, head = {first: layout.hops}, first  # every hop runs on the first device
    for d, layers in kv_layers.items():
        out["KV cache", d] += s.batch * s.tokens * layers * layout.kv_width * item
    # the logits in fp32, and lm-eval's log_softmax of them
    out["logits", head] += s.batch * s.tokens * layout.vocab * 4 * 2
    for d in devices if gpu else ():
        out["reserve", d] += GPU_RESERVE
    return [Row(p, w, b) for (p, w), b in out.items() if b > 0]


def _engine_rows(layout: Layout, s: Setting, aliases: tuple[str, ...]) -> list[Row]:
    """What a vLLM worker holds (parameter_space.EngineCandidate): resident sources, no eval
    model, one engine tensor parallel over the worker's GPUs (matrices sharded, vectors not).

    - reload buffer: in-place reload gathers a whole (fused: q/k/v, gate/up) module and
      materializes it on the rank before copying it in; with one GPU, plus the merged tensors
      held until then;
    - write batches (several GPUs): a decoder layer on the host, its pickle, and each rank's
      unpickled copy;
    - activations: one step's prefill (max_num_batched_tokens tokens: MLP widths, a few hidden
      states), those tokens' prompt logits and log-probabilities in fp32 (lm-eval's
      loglikelihood asks for them), and the sampler's logits per sequence."""
    from evomerge.fitness.vllm_backend import kv_cache_bytes
    from evomerge.merge.engine import READ_AHEAD
    from evomerge.merge.ops.fused import GPU_CHUNK

    gpu = s.gpus > 0
    devices = _devices(s)
    ranks = s.gpus if gpu else 1
    item = _ITEMSIZE[s.dtype]
    on_gpu = gpu and s.gpus == 1  # the merge runs on the one GPU, else on the CPU
    merge_at = devices[0] if on_gpu or not gpu else HOST
    sources_at = devices[0] if (on_gpu and s.sources == "device") or not gpu else HOST
    out: dict[tuple[str, str], int] = defaultdict(int)

    def size(n: str) -> int:  # the merged tensor, as written
        return layout.numel[n] * item if layout.floating[n] else layout.stored[aliases[0]][n]

    def shard(n: str) -> int:
        return math.ceil(size(n) / ranks) if layout.matrix.get(n, True) else size(n)

    for n in layout.names:
        for a in aliases:
            out["sources", sources_at] += layout.stored[a][n]
    largest = max(layout.numel.values())
    entries = min(largest, GPU_CHUNK) if layout.chunked and merge_at != HOST and gpu else largest
    out["merge temporaries", merge_at] += (len(aliases) + 2) * entries * 4
    if on_gpu and s.sources == "host":  # read ahead, plus the tensor being merged
        inputs = max(sum(layout.stored[a][n] for a in aliases) for n in layout.names)
        out["sources window", devices[0]] += READ_AHEAD + inputs
    modules = _modules(layout.names)
    module = max(sum(size(n) for n in names) for names in modules.values())
    if not on_gpu and gpu:
        layer = max(sum(size(n) for n in names) for names in _layers(layout.names).values())
        out["vLLM write batches", HOST] += (2 + ranks) * layer
    length = _engine_tokens(layout, s)
    kv = kv_cache_bytes(layout.num_layers * layout.kv_width * item, length, s.batch)
    steps = s.batched_tokens
    prompt = min(steps, s.batch * length)  # the most prompt tokens one step holds
    activations = (
        steps * (3 * layout.intermediate // ranks + 4 * layout.hidden) * item
        + prompt * layout.vocab * (item + 8)
        + s.batch * layout.vocab * 8
    )
    for d in devices:
        out["vLLM weights", d] += sum(shard(n) for n in layout.names)
        out["vLLM reload buffer", d] += math.ceil(module / ranks) + (module if on_gpu else 0)
        if not gpu:  # in-process on the CPU: the merged tensors are handed over as they come
            out["vLLM reload buffer", d] += module
        out["vLLM KV cache", d] += kv
        out["vLLM activations", d] += activations
        if gpu:
            out["vLLM CUDA graphs", d] += VLLM_GRAPHS
            out["reserve", d] += GPU_RESERVE
    return [Row(p, w, b) for (p, w), b in out.items() if b > 0]


_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj"}
_FUSED |= {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def _modules(names: tuple[str, ...]) -> dict[str, list[str]]:
    """The base's tensors grouped as vLLM's modules hold them (q/k/v and gate/up fused)."""
    out: dict[str, list[str]] = defaultdict(list)
    for n in names:
        parts = n.split(".")
        module = parts[:-1]
        if len(module) >= 1 and module[-1] in _FUSED:
            module = [*module[:-1], _FUSED[module[-1]]]
        out[".".join(module)].append(n)
    return out


def _layers(names: tuple[str, ...]) -> dict[object, list[str]]:
    """The base's tensors grouped as vllm_backend._by_layer batches them over several ranks."""
    from evomerge.merge.architecture import classify

    out: dict[object, list[str]] = defaultdict(list)
    for n in names:
        try:
            slot = classify(n)
            key: object = slot.layer if slot.group == "layer" else n
        except EvomergeError:
            key = n
        out[key].append(n)
    return out


def vllm_batched_tokens(gpu: bool, capacity: Capacity) -> int:
    """vLLM 0.32's default max_num_batched_tokens for the LLM class, which the engine keeps
    (vllm/engine/arg_utils.py, get_batch_defaults): 4096 on a CPU (one rank); on CUDA 16384
    from 70 GiB of GPU memory (an A100 aside), else 8192."""
    if not gpu:
        return 4096
    cap = capacity.gpu
    big = cap is not None and cap >= 70 * 2**30 and "a100" not in capacity.gpu_from.lower()
    return 16384 if big or cap is None else 8192


@dataclass
class MemoryPlan:
    """One worker's memory, part by part and device by device, and what it is checked against."""

    rows: list[Row]
    devices: tuple[str, ...]  # the worker's devices: its GPUs, or ("cpu",)
    sources: Sources  # resolved (auto: device where it fits, else host)
    configured: str  # workers.sources as configured
    capacity: Capacity
    workers_per_node: int
    workers_note: str
    sequence: SequenceLength
    setting: Setting
    layout: Layout = field(repr=False)
    aliases: tuple[str, ...] = field(repr=False)  # the base first, then the experts
    auto_note: str = ""

    @property
    def gpu(self) -> bool:
        return self.setting.gpus > 0

    @property
    def engine(self) -> bool:
        """A vLLM worker's plan (fitness.backend: vllm)."""
        return self.setting.backend == "vllm" and self.layout.kind == "parameter space"

    def bytes_of(self, where: str, part: str | None = None) -> int:
        return sum(r.nbytes for r in self.rows if r.where == where and part in (None, r.part))

    def gpu_totals(self) -> dict[str, int]:
        return {d: self.bytes_of(d) for d in self.devices} if self.gpu else {}

    def host_per_worker(self) -> int:
        """Host bytes of one worker: its pinned sources, or everything on a CPU worker."""
        return self.bytes_of(HOST) + (0 if self.gpu else self.bytes_of("cpu"))

    def host_total(self) -> int:
        return self.host_per_worker() * self.workers_per_node

    def fits_gpus(self) -> bool:
        cap = self.capacity.gpu
        return cap is None or all(t <= cap for t in self.gpu_totals().values())

    def fits_host(self) -> bool:
        cap = self.capacity.host
        return cap is None or self.host_total() <= cap

    def replan(self, **changes) -> MemoryPlan:
        """The same plan under other settings (gpus, sources, batch, tokens, dtype)."""
        setting = dataclasses.replace(self.setting, **changes)
        return dataclasses.replace(
            self,
            rows=_rows(self.layout, setting, self.aliases),
            setting=setting,
            sources=setting.sources,
            devices=_devices(setting),
        )

    # -- the one-line refusal -----------------------------------------------------------------
    def problem(self) -> str | None:
        if not self.fits_gpus():
            return self._gpu_problem()
        if not self.fits_host():
            return self._host_problem()
        return None

    def _parts(self, where: tuple[str, ...]) -> list[tuple[str, int]]:
        sums = {p: sum(self.bytes_of(w, p) for w in where) for p in PARTS}
        return sorted(((p, b) for p, b in sums.items() if b > 0), key=lambda pb: -pb[1])

    def _gpu_problem(self) -> str:
        cap = self.capacity.gpu
        assert cap is not None
        totals = self.gpu_totals()
        device = max(totals, key=lambda d: totals[d])
        parts = self._parts((device,))
        listed = ", ".join(f"{p} {_size(b)}" for p, b in parts)
        largest = parts[0][0]
        return (
            f"memory: a worker needs {_size(totals[device])} on {device} ({listed}) against "
            f"{_size(cap)} ({self.capacity.gpu_from}); the largest part is the {largest}: "
            f"{self._gpu_fixes(largest)}"
        )

    def _gpu_fixes(self, part: str) -> str:
        """What fixes the largest part: the settings that shrink it, each checked to make the
        plan fit (where none does alone, the settings that shrink it most)."""
        s = self.setting
        if part in ("KV cache", "logits", "vLLM KV cache"):
            batch = next((b for b in _halvings(s.batch) if self.replan(batch=b).fits_gpus()), None)
            return f"set fitness.batch_size: {batch}" if batch else "lower fitness.batch_size"
        if self.layout.kind == "data flow":  # its models load whole on the first GPU
            return (
                "use smaller models or a GPU with more memory (a data-flow path loads its "
                "models whole on the worker's first GPU)"
            )
        fixes: list[str] = []
        if part == "sources" and s.sources == "device" and self.replan(sources="host").fits_gpus():
            fixes.append("workers.sources: host")
        if (
            part in ("candidate", "vLLM weights")
            and s.dtype == "float32"
            and self.replan(dtype="bfloat16").fits_gpus()
        ):
            fixes.append("space.dtype: bfloat16")
        # a worker's GPUs are one node's: those visible here, else a node of 8 assumed
        most = self.capacity.gpus_visible or max(NODE_GPUS, s.gpus)
        gpus = next(
            (g for g in range(s.gpus + 1, most + 1) if self.replan(gpus=g).fits_gpus()), None
        )
        if gpus is not None:
            fixes.append(f"workers.gpus_per_worker: {gpus}")
        if fixes:
            return "set " + " or ".join(fixes)
        # no one setting is enough: name those that shrink this part
        more = f"more GPUs per worker than {most}" if gpus is None else "more GPUs per worker"
        if part == "sources" and s.sources == "device":
            return f"set workers.sources: host and use {more}"
        if part in ("candidate", "vLLM weights") and s.dtype == "float32":
            return f"set space.dtype: bfloat16 and use {more}"
        return f"use {more}"

    def _host_problem(self) -> str:
        cap = self.capacity.host
        assert cap is not None
        n, per = self.workers_per_node, self.host_per_worker()
        where = (HOST,) if self.gpu else ("cpu",)
        listed = ", ".join(f"{p} {_size(b)}" for p, b in self._parts(where))
        fits = cap // per if per else n
        fixes = []
        if 1 <= fits < n:
            fixes.append(f"workers.count: {fits} (fewer workers per node)")
        on_device = self.replan(sources="device")
        if self.gpu and self.sources == "host" and on_device.fits_gpus() and on_device.fits_host():
            fixes.append("workers.sources: device")
        fix = "set " + " or ".join(fixes) if fixes else "use fewer or smaller models"
        if not fixes and self.gpu and self.sources == "host":
            fix = "use fewer or smaller models, or GPUs that hold them (workers.sources: device)"
        return (
            f"memory: {n} worker{'s need' if n > 1 else ' needs'} {_size(self.host_total())} of "
            f"host memory on a node ({n} x {listed}) against {_size(cap)} ({self.capacity.host_from}); "
            f"{fix}"
        )

    # -- the table ----------------------------------------------------------------------------
    def table(self):
        """The plan as a rich renderable: a table with one row per part and one column per
        device (GPUs that hold the same share one, e.g. the middle runs of layers; the host
        last), then where the sequence length and the capacities came from."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        s = self.setting
        how = f"{s.gpus} GPU{'s' * (s.gpus > 1)} per worker" if self.gpu else "CPU workers"
        engine = self.engine
        if engine:
            ranks = f", tensor parallel over {s.gpus}" if s.gpus > 1 else ""
            how += f", one vLLM engine{ranks}"
        shown = self.gpu and self.layout.kind != "data flow"  # else there is no choice
        sources = f"sources on {self.sources}" if shown else ""
        if self.configured == "auto" and sources:
            sources += f" (workers.sources: auto{': ' + self.auto_note if self.auto_note else ''})"
        title = ", ".join(
            x
            for x in (
                f"Memory plan, per worker: {self.layout.kind}",
                how,
                sources,
                f"candidate {s.dtype}",
                f"batch {s.batch} x {s.tokens} tokens" if not engine else "",
            )
            if x
        )
        parts = [p for p in PARTS if any(r.part == p for r in self.rows)]
        columns: list[tuple[str, list[str]]] = []  # (heading, the places it stands for)
        for d in self.devices if self.gpu else ["cpu"]:
            same = columns and self._column(columns[-1][1][0], parts) == self._column(d, parts)
            if same:
                columns[-1][1].append(d)
            else:
                columns.append((d, [d]))
        if self.gpu and self.bytes_of(HOST):
            columns.append((HOST, [HOST]))
        table = Table()
        table.add_column("part")
        for heading, places in columns:
            name = heading if len(places) == 1 else f"{places[0]}..{places[-1].split(':')[-1]}"
            table.add_column(name, justify="right")
        for p in parts:
            row = [self.bytes_of(places[0], p) for _, places in columns]
            table.add_row(p, *(_size(b) if b else "" for b in row), end_section=p == parts[-1])
        totals, capacities = [], []
        for _, places in columns:
            where = places[0]
            on_host = where in (HOST, "cpu")
            cap = self.capacity.host if on_host else self.capacity.gpu
            total = self.bytes_of(where)
            over = cap is not None and (self.host_total() if on_host else total) > cap
            totals.append(f"[bold red]{_size(total)}[/]" if over else f"[bold]{_size(total)}[/]")
            cell = "-" if cap is None else _size(cap)
            if on_host and cap is not None and self.workers_per_node > 1:
                cell += f" / {self.workers_per_node}"  # shared by the node's workers
            capacities.append(cell)
        table.add_row("total", *totals)
        table.add_row("capacity", *capacities)
        sequence_line = f"sequence: {self.sequence.note}"
        if s.tokens < self.sequence.tokens:
            sequence_line += f", capped at the model's context, {s.tokens}"
        notes = [
            sequence_line,
            f"GPU capacity: {_cap(self.capacity.gpu, self.capacity.gpu_from)}"
            if self.gpu
            else "GPU capacity: none needed (CPU workers)",
            f"host capacity: {_cap(self.capacity.host, self.capacity.host_from)}; "
            f"workers per node: {self.workers_per_node} ({self.workers_note})",
        ]
        if engine:
            notes[0] = (
                f"vLLM engine: max_model_len {_engine_tokens(self.layout, s)} (the tasks' "
                f"longest request in 32-token blocks, at most the model's context "
                f"{self.layout.engine_length}), its KV cache sized for fitness.batch_size "
                f"{s.batch} sequences of that length "
                f"on each GPU; {s.batched_tokens} tokens prefilled a step (vLLM's default); "
                f"the tasks' sequences: {self.sequence.note}"
            )
        return Group(Text(title, style="bold"), table, *(Text(n) for n in notes))

    def _column(self, where: str, parts: list[str]) -> list[int]:
        return [self.bytes_of(where, p) for p in parts]


def _cap(nbytes: int | None, source: str) -> str:
    return source if nbytes is None else f"{_size(nbytes)} ({source})"


def _halvings(batch: int) -> list[int]:
    out, b = [], batch // 2
    while b >= 1:
        out.append(b)
        b //= 2
    return out


def _size(nbytes: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if nbytes >= factor:
            return f"{nbytes / factor:.1f} {unit}"
    return f"{nbytes} B"


def _devices(s: Setting) -> tuple[str, ...]:
    return tuple(f"cuda:{i}" for i in range(s.gpus)) if s.gpus else ("cpu",)


def _gpu_workers(config: SearchConfig, capacity: Capacity) -> bool:
    """Whether the workers have GPUs: CUDA here, a declared gpu_memory (a cluster the driver
    cannot see), or a remote cluster (workers.address), unless workers.device is cpu."""
    wc = config.workers
    if wc.device == "cpu":
        return False
    return (
        wc.device == "cuda"
        or capacity.gpus_visible is not None
        or wc.gpu_memory is not None
        or wc.address is not None
    )


def _workers_per_node(config: SearchConfig, gpu: bool, capacity: Capacity) -> tuple[int, str]:
    """How many workers share one node's host memory. With the GPUs visible: the GPUs //
    gpus_per_worker (at most workers.count); a cluster the driver cannot see: all of
    workers.count on one node (the driver cannot tell how they spread: the safe side); CPU
    workers here: workers.count, else one per cpus_per_worker CPUs."""
    wc = config.workers
    if wc.count == 0:
        return 1, "workers.count: 0, one worker in the driver"
    if gpu and capacity.gpus_visible:
        per = max(1, capacity.gpus_visible // wc.gpus_per_worker)
        n = min(wc.count, per) if wc.count else per
        return n, f"{capacity.gpus_visible} GPUs here // {wc.gpus_per_worker} per worker"
    if not gpu and wc.address is None:
        n = wc.count or max(1, (os.cpu_count() or 1) // wc.cpus_per_worker)
        return n, "workers.count" if wc.count else f"one per {wc.cpus_per_worker} CPUs here"
    n = wc.count or 1
    return n, f"workers.count: {n}, assumed on one node" if wc.count else "assumed"


def plan_memory(
    config: SearchConfig,
    sequence: SequenceLength | None = None,
    capacity: Capacity | None = None,
    layout: Layout | None = None,
) -> MemoryPlan:
    """One worker's memory plan. `sequence`: the tasks' longest request (default: lm-eval's
    default context); `capacity`: what to check against (default: `Capacity.detect`);
    `layout`: the models' sizes (default: read from their headers now)."""
    sequence = sequence or SequenceLength.default("the tasks' requests were not measured")
    capacity = capacity or Capacity.detect(config)
    layout = layout or Layout.read(config)
    wc = config.workers
    gpu = _gpu_workers(config, capacity)
    aliases = (config.base, *config.experts)
    engine = config.fitness.backend == "vllm" and layout.kind == "parameter space"
    setting = Setting(
        gpus=wc.gpus_per_worker if gpu else 0,
        sources="device",
        batch=config.fitness.batch_size,
        tokens=min(sequence.tokens, layout.max_length),
        dtype=config.merge_dtype,
        backend=config.fitness.backend,
        batched_tokens=vllm_batched_tokens(gpu, capacity) if engine else 0,
    )
    per_node, note = _workers_per_node(config, gpu, capacity)
    plan = MemoryPlan(
        rows=_rows(layout, setting, aliases),
        devices=_devices(setting),
        sources="device",
        configured=wc.sources,
        capacity=capacity,
        workers_per_node=per_node,
        workers_note=note,
        sequence=sequence,
        setting=setting,
        layout=layout,
        aliases=aliases,
    )
    if engine and gpu:
        # EngineCandidate keeps its sources on the GPU only when told to (device) on one GPU:
        # auto leaves the GPU to the engine's weights and KV cache
        if wc.sources == "device" and wc.gpus_per_worker == 1:
            return plan
        plan = plan.replan(sources="host")
        if wc.sources == "auto":
            plan.auto_note = "host, the vLLM engine's weights and KV cache share the GPU"
        return plan
    host_mode = gpu and layout.kind != "data flow"  # a data-flow path loads on its GPU only
    if host_mode and wc.sources == "host":
        return plan.replan(sources="host")
    if host_mode and wc.sources == "auto":
        if capacity.gpu is None:
            plan.auto_note = "no GPU capacity known: device, the worker decides on its own GPU"
        elif not plan.fits_gpus():
            device = max(plan.gpu_totals().values())
            plan = plan.replan(sources="host")
            plan.auto_note = f"on device a worker would need {_size(device)} per GPU"
    return plan


def choose_sources(
    config: SearchConfig, gpu_bytes: int | None, sequence: int = DEFAULT_SEQUENCE
) -> Sources:
    """Where a worker keeps its sources: workers.sources, or for auto `device` when the device
    plan fits in `gpu_bytes` (this worker's GPU), else `host`. CPU workers (or no GPU size):
    `device`. Cheap: the headers and config.json only, no tasks (`sequence`: the scored
    sequences' tokens, when the worker knows them)."""
    wc = config.workers
    if wc.device == "cpu" or gpu_bytes is None:  # host memory is the device's own
        return "device"
    if wc.sources != "auto":
        return wc.sources
    capacity = Capacity(gpu_bytes, "this worker's GPU", None, "not checked")
    forced = config.model_copy(
        update={"workers": wc.model_copy(update={"device": "cuda", "sources": "device"})}
    )
    plan = plan_memory(forced, SequenceLength(sequence, "given"), capacity)
    return "device" if plan.fits_gpus() else "host"


def with_planned_sources(config: SearchConfig, plan: MemoryPlan | None) -> SearchConfig:
    """`config` with workers.sources auto replaced by the driver's choice, where the driver's
    plan knew the GPUs' memory and the tasks' lengths: a worker left to choose knows its GPU but
    not the tasks, and would size the KV cache at DEFAULT_SEQUENCE."""
    wc = config.workers
    if plan is None or wc.sources != "auto" or not plan.gpu or plan.capacity.gpu is None:
        return config
    return config.model_copy(update={"workers": wc.model_copy(update={"sources": plan.sources})})
