"""Source models kept resident on a device, and candidates materialized in place from them.

The search sends a worker recipes, not weights: the worker holds every source tensor (and, for
task-arithmetic methods, every task vector) on its device once, and writes each candidate's
merge straight into one preallocated eval model's parameters. Same math as `evomerge merge`
(`engine.iter_merged`), so a scored candidate is exactly the model its recipe rebuilds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from evomerge.merge.architecture import ModelInfo
from evomerge.merge.checkpoint import Checkpoint
from evomerge.merge.engine import TensorJob, check_compatible, merge_stream
from evomerge.merge.errors import EvomergeError
from evomerge.merge.parallel import Workers, merge_threads
from evomerge.merge.recipe import Recipe
from evomerge.merge.sources import TensorSource


class ResidentModel:
    """One source model's tensors on a device (fp32): a TensorSource."""

    def __init__(self, ckpt: Checkpoint, device: str):
        self.info: ModelInfo = ckpt.info
        self.path = ckpt.path
        self.names = ckpt.names
        self._dtypes = {n: ckpt.dtype(n) for n in self.names}
        self._shapes = {n: ckpt.shape(n) for n in self.names}
        self.tensors = {
            n: ckpt.get(n).to(device, torch.float32 if ckpt.dtype(n).is_floating_point else None)
            for n in self.names
        }

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class ResidentTaskVector(ResidentModel):
    """A resident source kept as its task vector (source - base): a DeltaSource. Its raw float
    tensors are dropped, so it costs no more memory than the model itself."""

    def __init__(self, model: ResidentModel, base: ResidentModel):
        self.info, self.path, self.names = model.info, model.path, model.names
        self._dtypes, self._shapes, self._base = model._dtypes, model._shapes, base
        self._deltas = {
            n: t - base.tensors[n] for n, t in model.tensors.items() if t.is_floating_point()
        }
        self.tensors = {n: t for n, t in model.tensors.items() if not t.is_floating_point()}

    def get(self, name: str) -> torch.Tensor:
        """The source tensor, rebuilt as base + task vector (to fp32 rounding): for the rare
        merge that reads the model itself, e.g. scoring the parent alone."""
        if name in self._deltas:
            return self._base.get(name) + self._deltas[name]
        return self.tensors[name]

    def delta(self, name: str) -> torch.Tensor:
        return self._deltas[name]


class ResidentSources:
    """Every model of a search, resident on `device`."""

    def __init__(
        self,
        models: dict[str, Path],
        base: str,
        device: str,
        task_vectors: bool,
        threads: int | None = None,
    ):
        ckpts = {a: Checkpoint(p, label=f"models.{a}") for a, p in models.items()}
        check_compatible(ckpts, reference=base)
        self.base = base
        self.device = device
        self.models: dict[str, ResidentModel] = {
            a: ResidentModel(c, device) for a, c in ckpts.items()
        }
        if task_vectors:
            for alias, m in self.models.items():
                if alias != base:
                    self.models[alias] = ResidentTaskVector(m, self.models[base])
        # the threads that merge every candidate, with their scratch buffers: at most the torch
        # threads this worker was given, fewer on a busy machine (merge.parallel)
        if threads is None:
            threads = min(merge_threads(), torch.get_num_threads())
        self.workers = Workers(threads if device == "cpu" else 1)

    def materialize(self, recipe: Recipe, model: torch.nn.Module) -> None:
        """Write the recipe's merge into `model`'s parameters in place."""
        merge_into_model(recipe, self.models, model, self.device, self.workers, read_ahead=False)


@torch.no_grad()
def merge_into_model(
    recipe: Recipe,
    sources: Mapping[str, TensorSource],
    model: torch.nn.Module,
    device: str = "cpu",
    workers: Workers | None = None,
    read_ahead: bool = True,
) -> None:
    """Write the recipe's merge into `model`'s parameters: each merged tensor is computed a chunk
    at a time straight into its parameter (no temporary of its size) when the parameter has the
    recipe's dtype. A tied head (a checkpoint's `lm_head.weight` that is the embedding in the
    model) is not written. Sources on disk are read ahead with `read_ahead`."""
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

    for job, tensor in merge_stream(recipe, sources, device, target, names, workers, read_ahead):
        p = params[job.name]
        if tensor.data_ptr() != p.data_ptr():  # not merged in place (another dtype or layout)
            p.copy_(tensor)
