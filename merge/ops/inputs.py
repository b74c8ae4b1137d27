"""What a merge of one tensor reads: the one typed object the methods and the kernels take.

Frozen so that a path handing it on (the chunked GPU path slices it with `dataclasses.replace`)
cannot change what another path sees; apart from merge.registry so that the kernels, which the
registry calls, can name it without an import cycle; torch-free at import, as the registry is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evomerge.merge.ops.rescale import Rescale

if TYPE_CHECKING:
    import torch

    from evomerge.merge.ops.masks import Generator


@dataclass(frozen=True)
class TensorInputs:
    """Everything a method sees to merge one tensor: tensors as stored (bf16 stays bf16; the
    merge computes in fp32), on one device."""

    base: torch.Tensor | None
    sources: Sequence[torch.Tensor]  # one per merged model (the base excluded if it needs one)
    params: Sequence[dict[str, float]]  # per merged model: every declared model parameter
    group: dict[str, float]  # every declared group parameter
    normalize: bool = False
    rescale: Rescale = Rescale.none
    generator: Generator | None = None  # seeded, for random methods
