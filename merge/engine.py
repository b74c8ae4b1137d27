"""Rebuild a recipe's merge: check the sources agree, then merge and write a tensor at a time."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from evomerge.merge.architecture import classify
from evomerge.merge.errors import EvomergeError
from evomerge.merge.io.checkpoint import Checkpoint
from evomerge.merge.io.files import guard_output, staged_dir, write_marker
from evomerge.merge.io.pipeline import ReadAhead, WriteBehind
from evomerge.merge.io.safetensors_io import BufferPool, ShardWriter, TensorSpec, plan_shards
from evomerge.merge.io.sources import TensorSource
from evomerge.merge.ops.kernels import NonFinite
from evomerge.merge.ops.masks import CounterDraws, Generator
from evomerge.merge.ops.registry import TensorInputs, merge_tensor_into
from evomerge.merge.parallel import Workers, merge_threads, single_thread
from evomerge.merge.recipe import Group, ParameterSpace, Recipe

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)


MERGE_MARKER = "merge"


def check_device(device: str) -> None:
    """`cpu`, `cuda` or `cuda:N` on a machine that has it; anything else is one clear line."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise EvomergeError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EvomergeError(f"--device {device}: CUDA is not available here; use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise EvomergeError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )


def tensor_seed(seed: int, name: str) -> int:
    """The seed of one tensor's random masks: stable across runs, devices and tensor order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def open_sources(recipe: Recipe) -> dict[str, Checkpoint]:
    """Open every model of the recipe and refuse disagreeing ones before any work starts."""
    ckpts = {
        alias: Checkpoint(
            ref.local(f"models.{alias}"), label=f"models.{alias}", allow_pickle=recipe.allow_pickle
        )
        for alias, ref in recipe.models.items()
    }
    check_compatible(ckpts, reference=recipe.main_alias)
    return ckpts


def check_compatible(ckpts: dict[str, Checkpoint], reference: str) -> None:
    ref = ckpts[reference]
    for alias, ck in ckpts.items():
        if alias == reference:
            continue
        a, b = ref.info, ck.info
        pair = f"models {reference!r} and {alias!r}"
        if a.model_type != b.model_type or a.architectures != b.architectures:
            raise EvomergeError(
                f"{pair} have different architectures ({a.model_type or a.architectures} vs "
                f"{b.model_type or b.architectures}); merge models that share a base"
            )
        if a.vocab_size != b.vocab_size:
            raise EvomergeError(
                f"{pair} have different vocabulary sizes ({a.vocab_size} vs {b.vocab_size}, "
                "config.json vocab_size); merge models that share a tokenizer"
            )
        if a.num_layers != b.num_layers:
            raise EvomergeError(f"{pair} have {a.num_layers} vs {b.num_layers} layers")
        ref_names, other_names = set(ref.names), set(ck.names)
        only_ref = [n for n in ref.names if n not in other_names]
        only_other = [n for n in ck.names if n not in ref_names]
        if only_ref or only_other:
            name, owner = (only_ref[0], reference) if only_ref else (only_other[0], alias)
            raise EvomergeError(
                f"tensor {name!r} is only in model {owner!r} ({pair} have different tensor "
                "sets); merge checkpoints of the same architecture"
            )
        for name in ref.names:
            if ref.shape(name) != ck.shape(name):
                raise EvomergeError(
                    f"tensor {name!r}: shape {list(ref.shape(name))} in {reference!r} but "
                    f"{list(ck.shape(name))} in {alias!r}; merge models of the same size"
                )


@dataclass(frozen=True)
class TensorJob:
    """One output tensor of a parameter-space merge: what it reads and how it merges."""

    name: str
    dtype: torch.dtype  # of the output: the recipe's for floating tensors, else the source's
    shape: tuple[int, ...]
    group: Group | None  # None: an integer buffer, copied from the reference model, never merged
    base: str | None  # alias of the base the method reads, if it needs one
    aliases: tuple[str, ...]  # the merged models

    @property
    def reads(self) -> tuple[str, ...]:
        return (*((self.base,) if self.base else ()), *self.aliases)


def output_dtype(recipe: Recipe, stored: torch.dtype) -> torch.dtype:
    """A merged checkpoint's dtype for a tensor stored as `stored`: the recipe's for floating
    tensors; integer buffers keep theirs (they are copied, never averaged)."""
    return getattr(torch, recipe.dtype) if stored.is_floating_point else stored


def plan_merge(
    recipe: Recipe, ckpts: Mapping[str, TensorSource], names: Iterable[str] | None = None
) -> list[TensorJob]:
    """The jobs of a parameter-space merge in the reference's order (only `names`, if given)."""
    ps = recipe.parameter_space
    if ps is None:
        raise EvomergeError("recipe: no parameter_space stage to merge")
    ref = ckpts[recipe.main_alias]
    num_layers = ref.info.num_layers
    table = ps.layout(num_layers)
    method = ps.merge_method
    wanted = None if names is None else set(names)
    jobs = []
    for name in ref.names:
        if wanted is not None and name not in wanted:
            continue
        shape = tuple(ref.shape(name))
        dtype = output_dtype(recipe, ref.dtype(name))
        if not ref.dtype(name).is_floating_point:  # integer buffers are copied, never averaged
            jobs.append(TensorJob(name, dtype, shape, None, None, (recipe.main_alias,)))
            continue
        group = ParameterSpace.group_for(table, classify(name), num_layers)
        base = ps.base if ps.base and method.needs_base else None
        jobs.append(TensorJob(name, dtype, shape, group, base, tuple(ps.merged_models(group))))
    return jobs


def _load(job: TensorJob, ckpts: Mapping[str, TensorSource], device: str) -> dict:
    """The tensors a job reads, as stored (the merge converts to fp32 a chunk at a time), on
    `device`. Checkpoint tensors merged on the CPU are mapped from the page cache (no copy);
    pinned host tensors go to a GPU without blocking (the caller orders the streams)."""

    def get(alias: str) -> torch.Tensor:
        src = ckpts[alias]
        if device == "cpu" and isinstance(src, Checkpoint):
            mapped = src.map(job.name)  # None for a pickle's tensors, or an empty one
            if mapped is not None:
                return mapped
        t = src.get(job.name)
        return t.to(device, non_blocking=t.is_pinned())

    if job.group is None:
        return {"copy": get(job.aliases[0])}
    base = get(job.base) if job.base else None
    return {"base": base, "sources": [get(a) for a in job.aliases]}


def _input_bytes(job: TensorJob, ckpts: Mapping[str, TensorSource]) -> int:
    n = math.prod(job.shape)
    return sum(n * ckpts[a].dtype(job.name).itemsize for a in job.reads)


def merge_job(
    recipe: Recipe, job: TensorJob, loaded: dict, out: torch.Tensor, workers: Workers
) -> None:
    """Merge one tensor into `out` (its shape, the job's dtype): the bits of the reference."""
    if job.group is None:
        out.copy_(loaded["copy"])
        return
    ps = recipe.parameter_space
    assert ps is not None
    method = ps.merge_method
    generator: Generator | None = None
    if method.random:
        seed = tensor_seed(ps.seed, job.name)
        generator = (
            CounterDraws(seed) if ps.masks == "counter" else torch.Generator().manual_seed(seed)
        )
    inputs = TensorInputs(
        base=loaded["base"],
        sources=loaded["sources"],
        params=[ps.model_values(job.group, a) for a in job.aliases],
        group=ps.group_values(job.group),
        normalize=ps.options_normalize,
        rescale=ps.options_rescale,
        generator=generator,
    )
    try:
        merge_tensor_into(method, inputs, out, workers)
    except ValueError as e:
        raise EvomergeError(f"tensor {job.name!r} (group {job.group.label()}): {e}") from None
    except NonFinite:
        raise EvomergeError(
            f"tensor {job.name!r}: the merge produced NaN or inf; check the weights"
        ) from None


READ_AHEAD = 256 * 2**20  # bytes of inputs read ahead of the merge
WRITE_BEHIND = 256 * 2**20  # bytes of merged tensors waiting for the writer


def merge_stream(
    recipe: Recipe,
    ckpts: Mapping[str, TensorSource],
    device: str | Callable[[str], str] = "cpu",
    out_for: Callable[[TensorJob], torch.Tensor | None] | None = None,
    names: Iterable[str] | None = None,
    workers: Workers | None = None,
    read_ahead: bool = True,
) -> Iterator[tuple[TensorJob, torch.Tensor]]:
    """Yield (job, merged tensor) in the reference's order, each tensor merged into
    `out_for(job)` (e.g. a model's parameter, written in place) or, where that gives None, into
    a new tensor, on `device` (or `device(tensor name)`: a model split over GPUs). With
    `read_ahead`, a background thread reads (maps) the next tensors' inputs; inputs bound for a
    GPU are copied there on a side stream, overlapping the merge of the tensor before."""
    ps = recipe.parameter_space
    if ps is None:
        raise EvomergeError("recipe: no parameter_space stage to merge")
    jobs = plan_merge(recipe, ckpts, names)
    where = device if callable(device) else (lambda name: device)
    own = workers is None
    on_cpu = all(where(j.name) == "cpu" for j in jobs)
    pool = workers if workers is not None else Workers(merge_threads() if on_cpu else 1)
    copy_streams: dict[str, torch.cuda.Stream] = {}

    def load(job: object) -> dict:
        job = cast(TensorJob, job)
        dev = where(job.name)
        if not (read_ahead and dev.startswith("cuda")):
            return _load(job, ckpts, dev)
        if dev not in copy_streams:
            copy_streams[dev] = torch.cuda.Stream(device=dev)
        with torch.cuda.stream(copy_streams[dev]):
            loaded = _load(job, ckpts, dev)
            loaded["ready"] = copy_streams[dev].record_event()
        return loaded

    def size(job: object) -> int:
        return _input_bytes(job, ckpts)  # type: ignore[arg-type]

    reader: ReadAhead | None = ReadAhead(jobs, load, size, READ_AHEAD) if read_ahead else None
    try:
        loads: Iterable = reader if reader is not None else ((j, load(j), None) for j in jobs)
        for job, loaded, release in loads:
            job = cast(TensorJob, job)
            ready = loaded.pop("ready", None)
            if ready is not None:  # merge only once the copies landed; keep their memory until
                # this stream is done with it (it was allocated on the copy stream)
                current = torch.cuda.current_stream(where(job.name))
                current.wait_event(ready)
                for t in _tensors(loaded):
                    t.record_stream(current)
            out = out_for(job) if out_for is not None else None
            if out is None:
                out = torch.empty(job.shape, dtype=job.dtype, device=where(job.name))
            with single_thread():  # an OpenMP region here would leave threads spinning
                merge_job(recipe, job, loaded, out, pool)
            del loaded
            if release is not None:
                release()
            yield job, out
    finally:
        if reader is not None:
            reader.close()
        if own:
            pool.close()


def _tensors(loaded: dict) -> list[torch.Tensor]:
    return [
        t for v in loaded.values() for t in (v if isinstance(v, list) else [v]) if t is not None
    ]


def iter_merged(
    recipe: Recipe, ckpts: Mapping[str, TensorSource]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor in the recipe dtype, on the CPU), in the reference's order,
    from Checkpoints or the search's resident sources."""
    for job, tensor in merge_stream(recipe, ckpts):
        yield job.name, tensor


def output_specs(recipe: Recipe, ref: Checkpoint) -> list[TensorSpec]:
    return [TensorSpec(n, output_dtype(recipe, ref.dtype(n)), ref.shape(n)) for n in ref.names]


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper().replace(" ", "")
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    if s.isdigit():
        return int(s)
    raise EvomergeError(f"--max-shard-size {text!r}: use a size like 5GB, 500MB or 2GiB")


def _write_checkpoint(
    tmp: Path,
    specs: list[TensorSpec],
    tensors: Iterator[tuple[str, torch.Tensor]],
    limit: int,
    progress: Progress | None,
    buffers: BufferPool | None = None,
) -> None:
    """Stream tensors (in `specs` order) into shards of at most `limit` bytes, plus the index;
    each tensor written is given back to `buffers`, if given."""
    shards = plan_shards(specs, limit)
    names = [
        "model.safetensors"
        if len(shards) == 1
        else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        for i in range(len(shards))
    ]
    shard_of = {s.name: i for i, shard in enumerate(shards) for s in shard}
    writers: dict[int, ShardWriter] = {}

    def write(item: object) -> None:  # in the writer thread, in order
        name, tensor = cast(tuple[str, torch.Tensor], item)
        i = shard_of[name]
        if i not in writers:
            writers[i] = ShardWriter(tmp / names[i], shards[i])
        writers[i].write(name, tensor)
        if buffers is not None:
            buffers.give(tensor)
        if writers[i].done:
            writers.pop(i).close()

    writer = WriteBehind(write, WRITE_BEHIND)
    try:
        for done, (name, tensor) in enumerate(tensors, start=1):
            writer.submit((name, tensor), tensor.numel() * tensor.element_size())
            if progress:
                progress(done, len(specs), name)
        writer.finish()
    except BaseException:
        writer.abandon()
        for w in writers.values():
            w.abandon()
        raise
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {s.name: names[shard_of[s.name]] for s in specs},
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def path_plan(
    recipe: Recipe, ckpts: Mapping[str, Checkpoint]
) -> list[tuple[str, str, str, float, float]]:
    """(output name, source alias, source name, divisor, offset) of a data-flow path's checkpoint.

    One layer per hop; hop k's residual writers are divided by the product of the scales up to
    and including hop k, around their gain offset (see merge.dataflow)."""
    from evomerge.merge.architecture import network_order
    from evomerge.merge.dataflow import family, folded_layer_tensors

    df = recipe.data_flow
    assert df is not None
    embed = ckpts[df.embed_from]
    model_type = embed.info.model_type
    family(model_type)
    check_compatible(
        {a: ckpts[a] for a in {df.embed_from, *(h.model for h in df.path)}}, reference=df.embed_from
    )
    plan = {n: (df.embed_from, n, 1.0, 0.0) for n in embed.names if classify(n).group != "layer"}
    cumulative = 1.0
    for k, hop in enumerate(df.path):
        cumulative *= hop.scale
        src = ckpts[hop.model]
        if hop.layer >= src.info.num_layers:
            raise EvomergeError(
                f"data_flow.path.{k}: {hop.model} has {src.info.num_layers} "
                f"layers, no layer {hop.layer}"
            )
        for name, new, divisor, offset in folded_layer_tensors(
            src.names, hop.layer, k, cumulative, model_type
        ):
            plan[new] = (hop.model, name, divisor, offset)
    return [(n, *plan[n]) for n in network_order(list(plan))]


@contextlib.contextmanager
def _output_errors(out: Path) -> Iterator[None]:
    """An OSError while writing the staged output (a full disk, a quota) names the output the
    user asked for, not the staging directory, which is gone by then."""
    try:
        yield
    except OSError as e:
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(out)) from None


def merge_to_dir(
    recipe: Recipe,
    out: Path | str,
    device: str = "cpu",
    max_shard_size: int | str = "5GB",
    force: bool = False,
    progress: Progress | None = None,
    inputs: list[Path] | None = None,
) -> Path:
    """Merge to a model directory that transformers loads; nothing appears until it is complete.

    An existing `out` is replaced only with `force`, and only if `evomerge merge` wrote it;
    `inputs` (beyond the recipe's models: e.g. the recipe file) must not be inside `out`."""
    out = Path(out)
    limit = parse_size(max_shard_size)
    sources = [m.local(f"models.{a}") for a, m in recipe.models.items()]
    guard_output(out, [*sources, *(inputs or [])], MERGE_MARKER, force)
    recipe = recipe.pinned()  # the recipe written beside the weights names exact revisions
    check_device(device)
    if recipe.data_flow is not None:
        return _merge_path_to_dir(recipe, out, device, limit, force, progress)
    ckpts = open_sources(recipe)
    ref = ckpts[recipe.main_alias]
    specs = output_specs(recipe, ref)
    with _output_errors(out), staged_dir(out, force) as tmp:
        buffers = BufferPool()

        def out_for(job: TensorJob) -> torch.Tensor | None:
            if device != "cpu":
                return None
            n = math.prod(job.shape) * job.dtype.itemsize
            return buffers.take(n).view(job.dtype).reshape(job.shape)

        stream = merge_stream(recipe, ckpts, device, out_for)
        merged = ((job.name, t) for job, t in stream)
        _write_checkpoint(tmp, specs, merged, limit, progress, buffers if device == "cpu" else None)
        ref.copy_side_files(tmp, getattr(torch, recipe.dtype))
        recipe.save(tmp / "evomerge_recipe.yaml")
        write_marker(tmp, MERGE_MARKER)
    return out


def _merge_path_to_dir(
    recipe: Recipe, out: Path, device: str, limit: int, force: bool, progress: Progress | None
) -> Path:
    from evomerge.merge.recipe import PS

    df = recipe.data_flow
    assert df is not None
    out_dtype = getattr(torch, recipe.dtype)
    with _output_errors(out), staged_dir(out, force) as tmp:
        used = {df.embed_from, *(h.model for h in df.path)}
        ckpts: dict[str, Checkpoint] = {
            a: Checkpoint(recipe.models[a].local(f"models.{a}"), f"models.{a}", recipe.allow_pickle)
            for a in used
            if a != PS
        }
        if PS in used:  # stage 1, merged to disk inside the staging dir, read back lazily
            stage = tmp / ".stage1"
            merge_to_dir(
                recipe.ps_only().model_copy(update={"dtype": "float32"}), stage, device, limit
            )
            ckpts[PS] = Checkpoint(stage, "parameter_space result")
        plan = path_plan(recipe, ckpts)
        specs = [
            TensorSpec(n, output_dtype(recipe, ckpts[a].dtype(s)), ckpts[a].shape(s))
            for n, a, s, _, _ in plan
        ]

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name, alias, src, divisor, offset in plan:
                t = ckpts[alias].get(src)
                if t.is_floating_point():
                    if divisor != 1.0:
                        t = (t.float() + offset) / divisor - offset
                    t = t.to(out_dtype)
                yield name, t

        _write_checkpoint(tmp, specs, tensors(), limit, progress)
        # each hop keeps its source layer's kind (Gemma 2/3 alternate sliding and global layers)
        types = [ckpts[h.model].info.raw.get("layer_types") or [] for h in df.path]
        ckpts[df.embed_from].copy_side_files(
            tmp,
            out_dtype,
            num_layers=len(df.path),
            layer_types=[t[h.layer] for t, h in zip(types, df.path)] if all(types) else None,
        )
        recipe.save(tmp / "evomerge_recipe.yaml")
        write_marker(tmp, MERGE_MARKER)
        if PS in used:
            shutil.rmtree(tmp / ".stage1")
    return out
