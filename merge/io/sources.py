"""What the merge engine reads tensors from: a checkpoint on disk, or sources resident in a
worker (merge.resident). Both offer the same read interface."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from evomerge.merge.architecture import ModelInfo


@runtime_checkable
class TensorSource(Protocol):
    info: ModelInfo

    @property
    def names(self) -> list[str]:
        """Tensor names in network order."""
        ...

    def dtype(self, name: str) -> torch.dtype: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...
