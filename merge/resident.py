"""Source models kept resident in a worker, and candidates materialized in place from them.

The search sends a worker recipes, not weights: the worker holds every source tensor once, in
the dtype it is stored in (a bf16 checkpoint stays bf16: the merge converts a chunk at a time to
fp32, which is exact, so the bits are those of a merge from disk), and writes each candidate's
merge straight into one eval model's parameters. Same math as `evomerge merge`
(`engine.merge_stream`), so a scored candidate is exactly the model its recipe rebuilds.

Where the sources live (`workers.sources`): `device`, each tensor on the device of the parameter
it serves (one GPU, or the GPU of its layer when a worker spans several: merge.placement);
`host`, in pinned host memory, streamed to the parameter's device tensor by tensor on a copy
stream while the previous tensor merges, so the GPU holds the candidate and a window of inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

from evomerge.merge.architecture import ModelInfo
from evomerge.merge.checkpoint import Checkpoint
from evomerge.merge.engine import TensorJob, check_compatible, merge_stream
from evomerge.merge.errors import EvomergeError
from evomerge.merge.parallel import Workers, merge_threads
from evomerge.merge.placement import Placement
from evomerge.merge.recipe import Recipe
from evomerge.merge.sources import TensorSource

Where = Literal["device", "host"]


class ResidentModel:
    """One source model's tensors, as stored, each on `placement`'s device for it (or in host
    memory, pinned when a GPU will read it): a TensorSource. Read a tensor at a time, so loading
    costs the resident bytes plus one tensor."""

    def __init__(self, ckpt: Checkpoint, placement: Placement, where: Where = "device"):
        self.info: ModelInfo = ckpt.info
        self.path = ckpt.path
        self.names = ckpt.names
        pin = where == "host" and any(d.startswith("cuda") for d in placement.devices)
        self.tensors: dict[str, torch.Tensor] = {}
        for n in self.names:
            t = ckpt.get(n)
            if where == "host":
                self.tensors[n] = t.pin_memory() if pin else t
            else:
                self.tensors[n] = t.to(placement.device_of(n))
            del t

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class ResidentSources:
    """Every model of a search, resident in the worker (`where`), placed as `placement` says."""

    def __init__(
        self,
        models: dict[str, Path],
        base: str,
        placement: Placement | str,
        where: Where = "device",
        threads: int | None = None,
    ):
        ckpts = {a: Checkpoint(p, label=f"models.{a}") for a, p in models.items()}
        check_compatible(ckpts, reference=base)
        if isinstance(placement, str):
            placement = Placement((placement,), ckpts[base].info.num_layers)
        self.base = base
        self.placement = placement
        self.where = where
        # one model at a time: each is read tensor by tensor straight to where it stays
        self.models: dict[str, ResidentModel] = {
            a: ResidentModel(c, placement, where) for a, c in ckpts.items()
        }
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
