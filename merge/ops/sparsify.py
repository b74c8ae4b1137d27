"""Sparsifiers of task vectors, fp32 in and out: the reference the chunked and fused paths match.

Magnitude rankings put the larger |d| first and, among equal ones, the lower flat index
(`selection`: the same on every device, where mergekit's unstable sort cannot be reproduced);
random masks come from the recipe's generator (`masks`).
"""

from __future__ import annotations

import torch

from evomerge.merge.ops import masks, selection
from evomerge.merge.ops.rescale import Rescale  # defined apart: recipes read it without torch


def _apply_mask(delta: torch.Tensor, mask: torch.Tensor, rescale: Rescale, p) -> torch.Tensor:
    masked = delta * mask
    if rescale is Rescale.inverse_density:
        return masked / p
    if rescale is Rescale.l1:
        before, after = delta.abs().sum(), masked.abs().sum()
        if before < 1e-7 or after < 1e-7:  # mergekit's guard against 0/0
            return masked
        return masked * (before / after)
    return masked


def magnitude(delta: torch.Tensor, density: float, rescale: Rescale = Rescale.none) -> torch.Tensor:
    """Keep the k = max(1, int(density * n)) entries largest in magnitude over the tensor (TIES)."""
    ranks = selection.magnitude_ranks(density, delta.numel())
    if ranks is None:
        return delta
    keep = ranks.mask(delta.abs())
    if rescale is Rescale.none:
        return torch.where(keep, delta, 0.0)  # one pass instead of a float mask and a product
    return _apply_mask(delta, keep.to(delta.dtype), rescale, density)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale: Rescale = Rescale.none
) -> torch.Tensor:
    """Drop the int(gamma * n) largest entries, keep the next int(density * n) (breadcrumbs).

    As mergekit: none kept when int(density * n) is 0, and the outlier cut moves up where it
    would leave fewer. Of tied entries the lower flat index ranks first: at the outlier cut it
    is dropped, at the bottom cut kept.
    """
    ranks = selection.outlier_ranks(density, gamma, delta.numel())
    if ranks is None:
        return delta
    if ranks.stop == 0:
        return torch.zeros_like(delta)
    mask = ranks.mask(delta.abs())
    return _apply_mask(delta, mask.to(delta.dtype), rescale, density)


def random(
    delta: torch.Tensor,
    density: float,
    generator: masks.Generator,
    rescale: Rescale = Rescale.inverse_density,
) -> torch.Tensor:
    """Keep each entry with probability `density` (DARE, Yu et al. 2023)."""
    if density >= 1:
        return delta
    mask = masks.uniform(generator, delta.shape, delta.device) < density
    return _apply_mask(delta, mask.to(delta.device, delta.dtype), rescale, density)


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: masks.Generator,
    rescale: Rescale = Rescale.inverse_density,
) -> torch.Tensor:
    """Keep entries with probabilities rising with their magnitude rank in each row (DELLA).

    p runs linearly from density - epsilon (smallest) to density + epsilon (largest) per row
    (Deep et al. 2024); under inverse_density a kept entry is divided by its own p. Ranks come
    from a stable sort: ties by lower index, as TIES and breadcrumbs rank them.
    """
    if density >= 1:
        return delta
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ValueError(
            f"epsilon {epsilon} with density {density}: need 0 < density ± epsilon < 1"
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    order = torch.sort(-rows.abs(), dim=1, stable=True).indices  # largest first, ties by index
    positions = torch.arange(rows.shape[1] - 1, -1, -1, dtype=torch.float32, device=rows.device)
    ranks = torch.empty_like(rows).scatter_(1, order, positions.expand_as(rows))  # 0 = smallest
    width = max(rows.shape[1] - 1, 1)
    probs = (density - epsilon) + (ranks / width) * 2 * epsilon
    draws = masks.uniform(generator, rows.shape, rows.device)
    keep = draws < probs.to(draws.device)
    mask = keep.to(delta.device, delta.dtype).reshape(delta.shape)
    return _apply_mask(delta, mask, rescale, probs.reshape(delta.shape))


def elect_positive(weighted: list[torch.Tensor]) -> torch.Tensor:
    """TIES sign election: per entry, True where the summed weighted deltas are >= 0."""
    total = weighted[0].clone()
    for x in weighted[1:]:
        total += x
    return total >= 0
