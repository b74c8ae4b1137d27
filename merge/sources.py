"""What the merge engine reads tensors from: a checkpoint on disk, or sources resident on a device.

Both offer the same read interface; resident sources may also hold task vectors (source - base)
so that the methods that work on task vectors skip the subtraction for every candidate.
"""

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


@runtime_checkable
class DeltaSource(TensorSource, Protocol):
    """A source that keeps its task vector (source - base) instead of its raw float tensors."""

    def delta(self, name: str) -> torch.Tensor: ...
