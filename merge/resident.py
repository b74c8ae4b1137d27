"""Source models kept resident on a device, and candidates materialized in place from them.

The search sends a worker recipes, not weights: the worker holds every source tensor (and, for
task-arithmetic methods, every task vector) on its device once, and writes each candidate's
merge straight into one preallocated eval model's parameters. Same math as `evomerge merge`
(`engine.iter_merged`), so a scored candidate is exactly the model its recipe rebuilds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.merge.architecture import ModelInfo
from evomerge.merge.checkpoint import Checkpoint
from evomerge.merge.engine import check_compatible, iter_merged
from evomerge.merge.errors import EvomergeError
from evomerge.merge.recipe import Recipe


class ResidentModel:
    """One source model's tensors on a device (fp32): a TensorSource."""

    def __init__(self, ckpt: Checkpoint, device: str):
        self.info: ModelInfo = ckpt.info
        self.path = ckpt.path
        self.names = ckpt.names
        self._dtypes = {n: ckpt.dtype(n) for n in self.names}
        self.tensors = {
            n: ckpt.get(n).to(device, torch.float32 if ckpt.dtype(n).is_floating_point else None)
            for n in self.names
        }

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class ResidentTaskVector(ResidentModel):
    """A resident source kept as its task vector (source - base): a DeltaSource. Its raw float
    tensors are dropped, so it costs no more memory than the model itself."""

    def __init__(self, model: ResidentModel, base: ResidentModel):
        self.info, self.path, self.names = model.info, model.path, model.names
        self._dtypes, self._base = model._dtypes, base
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

    def __init__(self, models: dict[str, Path], base: str, device: str, task_vectors: bool):
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

    @torch.no_grad()
    def materialize(self, recipe: Recipe, model: torch.nn.Module) -> None:
        """Write the recipe's merge into `model`'s parameters in place."""
        params = dict(model.named_parameters())
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        for name, tensor in iter_merged(recipe, self.models, self.device, to_cpu=False):
            target = params.get(name)
            if target is None:
                if tied and name == "lm_head.weight":
                    continue
                raise EvomergeError(f"tensor {name!r} has no parameter in the eval model")
            target.copy_(tensor)
