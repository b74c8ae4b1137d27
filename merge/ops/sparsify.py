"""Sparsification primitives for task vectors (deltas from the base).

TIES, DARE, breadcrumbs and DELLA are compositions of one of these with an optional sign
consensus (see `merge.methods`). All functions take and return fp32 tensors.

Randomness comes from a CPU `torch.Generator` on purpose: the same recipe seed then gives the
same masks on any device, so a merge scored on a GPU during search is the merge rebuilt on a CPU.

Magnitude rankings (TIES, breadcrumbs, DELLA) follow one total order, the same on any device:
larger magnitude first and, among equal magnitudes, the lower flat (row-major) index first. A
density then keeps exactly its count of entries (`merge.selection`, which every path calls),
even where many entries tie at the cut, which bf16 checkpoints make common (few distinct values).
mergekit also keeps exactly k, but picks among the tied entries through torch's unstable sort,
an order that is neither the index order nor reproducible across devices or torch versions, so
no implementation can promise its choice there; ours is deterministic. Elsewhere the two agree.
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
    """Keep the k = max(1, int(density * n)) entries largest in magnitude over the tensor (TIES).

    Exactly k, as mergekit: among entries tied in magnitude at the cut, the lowest flat indices
    are kept (mergekit's choice there comes from an unstable sort and cannot be reproduced; this
    rule gives the same mask on any device).
    """
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
    """Drop the `gamma` fraction of largest entries, then the smallest, keeping `density` (breadcrumbs).

    Keeps exactly int(density * n) entries (none when that is 0, as mergekit): in the ranking
    larger-magnitude-first, the int(gamma * n) first are dropped as outliers, the next ones kept.
    Outlier removal shrinks when it would leave fewer than `density` entries (as in mergekit).
    Ties at either cut follow the ranking: the lower flat index ranks first, so at the outlier cut
    it is dropped, at the bottom cut kept (mergekit's choice among ties comes from an unstable
    sort and cannot be reproduced; this rule gives the same mask on any device).
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

    Deep et al. 2024: p ranges linearly from density - epsilon (smallest) to density + epsilon
    (largest) within each row; kept entries are divided by their own p under inverse_density.
    Ranks come from a stable sort: among equal magnitudes the lower index ranks as the larger
    (the order TIES and breadcrumbs use), the same on any device, where mergekit's unstable
    argsort leaves ties in an unspecified order.
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
