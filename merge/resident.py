"""Source models kept resident in a worker, and candidates merged into the eval model in place.

Why and where: docs/ARCHITECTURE.md, "Where a worker keeps its weights". The merge is
`engine.merge_stream`'s, so a scored candidate is exactly the model its recipe rebuilds.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from evomerge.merge.architecture import ModelInfo
from evomerge.merge.engine import TensorJob, check_compatible, merge_stream
from evomerge.merge.errors import EvomergeError
from evomerge.merge.io.checkpoint import Checkpoint
from evomerge.merge.io.safetensors_io import all_finite, read_range
from evomerge.merge.io.sources import TensorSource
from evomerge.merge.parallel import Workers, merge_threads
from evomerge.merge.placement import Placement
from evomerge.merge.recipe import Recipe

Where = Literal["device", "host"]

PIECE = 8 << 20  # bytes per read: the unit threads share, and one staging buffer's size
STAGING = 2  # staging buffers per thread: one is read into while the other's copy runs
MAX_LOAD_THREADS = 8  # beyond this, reading a node's disk or page cache gains little


def load_threads(requested: int | None = None) -> int:
    """Threads that read the sources: `requested`, else the merge's count (the CPUs not busy,
    or EVOMERGE_THREADS: merge.parallel), at most MAX_LOAD_THREADS."""
    return max(1, requested) if requested else min(MAX_LOAD_THREADS, merge_threads())


@dataclass(frozen=True)
class LoadStats:
    """What loading the sources took: bytes read from the checkpoints, wall seconds, threads,
    and whether pieces went through pinned staging buffers to a GPU."""

    bytes: int
    seconds: float
    threads: int
    staged: bool

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def __add__(self, other: LoadStats) -> LoadStats:
        return LoadStats(
            self.bytes + other.bytes,
            self.seconds + other.seconds,
            max(self.threads, other.threads),
            self.staged or other.staged,
        )

    def as_dict(self) -> dict:
        return {
            "bytes": self.bytes,
            "seconds": self.seconds,
            "gb_per_s": self.gb_per_s,
            "threads": self.threads,
            "staged": self.staged,
        }


class Loader:
    """Reads checkpoints' tensors to where they stay, at disk or PCIe speed, on `threads` threads.

    Threads take PIECE-byte pieces from a shared counter and `pread` them (the GIL released).
    A piece for host memory lands in its final place and is checked there (`all_finite`). A
    piece for a GPU goes through one of its thread's pinned staging buffers (pageable memory
    would make the copy synchronous, through the driver's bounce buffer), copied `non_blocking`
    on the thread's stream and checked behind the copy; the flags are read once at the end. A
    buffer is reused once its last copy ended: threads x STAGING x PIECE bytes whatever the
    model's size. The bytes are the file's, whatever the threads or device."""

    def __init__(self, threads: int | None = None):
        self.threads = load_threads(threads)
        self.workers = Workers(self.threads)
        self._local = threading.local()
        self._streams: list[torch.cuda.Stream] = []
        self._lock = threading.Lock()
        self.staged = False  # whether any piece went through staging
        self.stats = LoadStats(0, 0.0, self.threads, False)

    def load(self, ckpt: Checkpoint, placement: Placement, where: Where) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, each where `placement` and `where` put it; NaN or inf in
        one is an error naming it (the first in network order), as Checkpoint.get names it."""
        t0 = time.perf_counter()
        entries = [ckpt.entry(n) for n in ckpt.names]
        if any(e is None for e in entries):  # a pickle checkpoint: already in memory
            tensors = self._from_memory(ckpt, placement, where)
        else:
            tensors = self._read(ckpt, placement, where)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        seconds = time.perf_counter() - t0
        self.stats += LoadStats(nbytes, seconds, self.threads, self.staged)
        return tensors

    def close(self) -> None:
        self.workers.close()
        self._local = threading.local()  # drops the staging buffers
        if self.staged and hasattr(torch._C, "_host_emptyCache"):
            # torch keeps freed pinned blocks cached (and pinned) for reuse: give the staging
            # buffers' pages back to the OS, nothing later needs their size
            torch._C._host_emptyCache()

    @staticmethod
    def _from_memory(ckpt: Checkpoint, placement: Placement, where: Where) -> dict:
        pin = where == "host" and any(d.startswith("cuda") for d in placement.devices)
        out = {}
        for n in ckpt.names:
            t = ckpt.get(n)
            if where == "host":
                out[n] = t.pin_memory() if pin else t
            else:
                out[n] = t.to(placement.device_of(n))
        return out

    def _read(self, ckpt: Checkpoint, placement: Placement, where: Where) -> dict:
        names = ckpt.names
        entries = [ckpt.entry(n) for n in names]
        pin = where == "host" and any(d.startswith("cuda") for d in placement.devices)
        homes = ["cpu" if where == "host" else placement.device_of(n) for n in names]
        dests: list[torch.Tensor | None] = [None] * len(names)

        def allocate(i: int) -> None:
            e = entries[i]
            assert e is not None
            dests[i] = torch.empty(e.shape, dtype=e.dtype, device=homes[i], pin_memory=pin)

        # in the threads: pinning pages is the costly part of allocating pinned memory
        self.workers.run(len(names), allocate)
        pieces = []
        for i, e in enumerate(entries):
            assert e is not None
            pieces += [(i, lo, min(e.nbytes, lo + PIECE)) for lo in range(0, e.nbytes, PIECE)]
        files = {e.file for e in entries if e is not None}
        fds = {f: os.open(f, os.O_RDONLY) for f in files}
        bad: list[int] = []  # tensors found non-finite on the host
        flags: list[tuple[int, torch.Tensor]] = []  # (tensor, its piece's all-finite on a GPU)

        def read(k: int) -> None:
            i, lo, hi = pieces[k]
            e, dest = entries[i], dests[i]
            assert e is not None and dest is not None
            flat = dest.reshape(-1)
            size = dest.element_size()
            part = flat[lo // size : hi // size]
            if dest.device.type == "cpu":
                read_range(fds[e.file], e, lo, flat.view(torch.uint8)[lo:hi])
                if not all_finite(part):
                    bad.append(i)
                return
            stage = self._staging(hi - lo)
            read_range(fds[e.file], e, lo, stage)
            stream = self._stream(dest.device)
            with torch.cuda.stream(stream):
                flat.view(torch.uint8)[lo:hi].copy_(stage, non_blocking=True)
                if dest.is_floating_point():
                    flags.append((i, torch.isfinite(part).all()))
                self._copied(stream)

        try:
            self.workers.run(len(pieces), read)
        finally:
            for s in self._streams:  # nothing may still copy from staging or into a dest
                s.synchronize()
            for fd in fds.values():
                os.close(fd)
        by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        for i, flag in flags:
            by_device.setdefault(flag.device, []).append((i, flag))
        for group in by_device.values():  # one transfer per GPU (the streams are done)
            oks = torch.stack([f for _, f in group]).cpu().tolist()
            bad += [i for (i, _), ok in zip(group, oks, strict=True) if not ok]
        if bad:
            raise ckpt.not_finite(names[min(bad)])
        return {n: t for n, t in zip(names, dests) if t is not None}

    def _staging(self, nbytes: int) -> torch.Tensor:
        """This thread's next pinned staging buffer (`nbytes` of it), once its last copy ended."""
        local = self._local
        if not hasattr(local, "buffers"):
            local.buffers = [
                torch.empty(PIECE, dtype=torch.uint8, pin_memory=True) for _ in range(STAGING)
            ]
            local.events = [None] * STAGING
            local.next = 0
            self.staged = True
        b = local.next
        if local.events[b] is not None:
            local.events[b].synchronize()  # the GIL is released while it waits
        local.current = b
        local.next = (b + 1) % STAGING
        return local.buffers[b][:nbytes]

    def _copied(self, stream: torch.cuda.Stream) -> None:
        """Mark the current staging buffer busy until what `stream` has queued so far ends."""
        # a fresh event each time: an event belongs to the first device it is recorded on
        event = torch.cuda.Event()
        event.record(stream)
        self._local.events[self._local.current] = event

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        """This thread's copy stream on `device` (one per thread and GPU: copies of different
        threads overlap, and a thread's copy and its check stay in order)."""
        local = self._local
        if not hasattr(local, "streams"):
            local.streams = {}
        stream = local.streams.get(device.index)
        if stream is None:
            stream = local.streams[device.index] = torch.cuda.Stream(device=device)
            with self._lock:
                self._streams.append(stream)
        return stream


class ResidentModel:
    """One source model's tensors, as stored, each on `placement`'s device for it (or in host
    memory, pinned when a GPU will read it): a TensorSource. Read by `loader` (one of its own
    when not given), so loading costs the resident bytes plus the staging buffers."""

    def __init__(
        self,
        ckpt: Checkpoint,
        placement: Placement,
        where: Where = "device",
        loader: Loader | None = None,
    ):
        self.info: ModelInfo = ckpt.info
        self.path = ckpt.path
        self.names = ckpt.names
        own = loader is None
        loader = loader or Loader()
        try:
            self.tensors: dict[str, torch.Tensor] = loader.load(ckpt, placement, where)
        finally:
            if own:
                loader.close()

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class ResidentSources:
    """Every model of a search, resident in the worker (`where`), placed as `placement` says.

    `threads`: the merge's (a CPU worker's); `load_threads`: those reading the sources at
    start-up. `load_stats`: what the load took, for the worker's log."""

    def __init__(
        self,
        models: dict[str, Path],
        base: str,
        placement: Placement | str,
        where: Where = "device",
        threads: int | None = None,
        load_threads: int | None = None,
    ):
        ckpts = {a: Checkpoint(p, label=f"models.{a}") for a, p in models.items()}
        check_compatible(ckpts, reference=base)
        if isinstance(placement, str):
            placement = Placement((placement,), ckpts[base].info.num_layers)
        self.base = base
        self.placement = placement
        self.where = where
        # one model at a time, each read straight to where it stays by the same threads
        loader = Loader(load_threads)
        try:
            self.models: dict[str, ResidentModel] = {
                a: ResidentModel(c, placement, where, loader) for a, c in ckpts.items()
            }
        finally:
            loader.close()
        self.load_stats: LoadStats = loader.stats
        # the threads that merge every candidate, with their scratch buffers: at most the torch
        # threads this worker was given, fewer on a busy machine (merge.parallel)
        if threads is None:
            threads = min(merge_threads(), torch.get_num_threads())
        on_cpu = placement.devices == ("cpu",)
        self.workers = Workers(threads if on_cpu else 1)

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.models.values())

    def materialize(self, recipe: Recipe, model: torch.nn.Module) -> None:
        """Write the recipe's merge into `model`'s parameters in place (host sources are read
        ahead, their copies to the GPU overlapping the merge)."""
        merge_into_model(recipe, self.models, model, self.workers, read_ahead=self.where == "host")


@torch.no_grad()
def merge_into_model(
    recipe: Recipe,
    sources: Mapping[str, TensorSource],
    model: torch.nn.Module,
    workers: Workers | None = None,
    read_ahead: bool = True,
) -> None:
    """Write the recipe's merge into `model`'s parameters, each on its parameter's device (a
    model split over GPUs merges each tensor where it lives): computed a chunk at a time
    straight into the parameter (no temporary of its size) when the parameter has the recipe's
    dtype. A tied head (a checkpoint's `lm_head.weight` that is the embedding in the model) is
    not written. Inputs not on their parameter's device are read ahead with `read_ahead`."""
    params = dict(model.named_parameters())
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    ref = sources[recipe.main_alias]
    names = [n for n in ref.names if not (tied and n == "lm_head.weight" and n not in params)]
    for name in names:
        if name not in params:
            raise EvomergeError(f"tensor {name!r} has no parameter in the eval model")

    def target(job: TensorJob) -> torch.Tensor | None:
        p = params[job.name]
        ok = p.dtype == job.dtype and p.is_contiguous() and tuple(p.shape) == job.shape
        return p.data if ok else None

    def device_of(name: str) -> str:
        return str(params[name].device)

    stream = merge_stream(recipe, sources, device_of, target, names, workers, read_ahead)
    for job, tensor in stream:
        p = params[job.name]
        if tensor.data_ptr() != p.data_ptr():  # not merged in place (another dtype or layout)
            p.copy_(tensor)
