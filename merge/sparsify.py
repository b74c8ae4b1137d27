"""Sparsification primitives for task vectors (deltas from the base).

TIES, DARE, breadcrumbs and DELLA are compositions of one of these with an optional sign
consensus (see `merge.methods`). All functions take and return fp32 tensors.

Randomness comes from a CPU `torch.Generator` on purpose: the same recipe seed then gives the
same masks on any device, so a merge scored on a GPU during search is the merge rebuilt on a CPU.
"""

from __future__ import annotations

from enum import Enum

import torch


class Rescale(str, Enum):
    """How kept entries are rescaled after dropping."""

    none = "none"
    inverse_density = "inverse_density"  # x / p: the DARE and DELLA papers
    l1 = "l1"  # match the L1 norm of the unmasked tensor: mergekit's behaviour


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry (1-based) of a flat tensor, in O(n) (kthvalue is k-th smallest)."""
    return torch.kthvalue(values, values.numel() - k + 1).values


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
    """Keep the `density` fraction of entries largest in magnitude over the whole tensor (TIES)."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    flat = delta.abs().reshape(-1)
    threshold = _kth_largest(flat, k)
    mask = (delta.abs() >= threshold).to(delta.dtype)
    return _apply_mask(delta, mask, rescale, density)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale: Rescale = Rescale.none
) -> torch.Tensor:
    """Drop the `gamma` fraction of largest entries, then the smallest, keeping `density` (breadcrumbs).

    Outlier removal shrinks when it would leave fewer than `density` entries (as in mergekit).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    if keep == 0:
        return torch.zeros_like(delta)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep - n_top)
    flat = delta.abs().reshape(-1)
    # kept: ascending ranks n_bottom .. n_bottom + keep - 1
    upper = torch.kthvalue(flat, n_bottom + keep).values
    mask = delta.abs() <= upper
    if n_bottom > 0:
        lower = torch.kthvalue(flat, n_bottom + 1).values
        mask &= delta.abs() >= lower
    return _apply_mask(delta, mask.to(delta.dtype), rescale, density)


def random(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator,
    rescale: Rescale = Rescale.inverse_density,
) -> torch.Tensor:
    """Keep each entry with probability `density` (DARE, Yu et al. 2023)."""
    if density >= 1:
        return delta
    mask = torch.rand(delta.shape, generator=generator) < density
    return _apply_mask(delta, mask.to(delta.device, delta.dtype), rescale, density)


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: Rescale = Rescale.inverse_density,
) -> torch.Tensor:
    """Keep entries with probabilities rising with their magnitude rank in each row (DELLA).

    Deep et al. 2024: p ranges linearly from density - epsilon (smallest) to density + epsilon
    (largest) within each row; kept entries are divided by their own p under inverse_density.
    """
    if density >= 1:
        return delta
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ValueError(
            f"epsilon {epsilon} with density {density}: need 0 < density ± epsilon < 1"
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)  # 0 = smallest
    width = max(rows.shape[1] - 1, 1)
    probs = (density - epsilon) + (ranks / width) * 2 * epsilon
    keep = torch.rand(rows.shape, generator=generator) < probs.cpu()
    mask = keep.to(delta.device, delta.dtype).reshape(delta.shape)
    return _apply_mask(delta, mask, rescale, probs.reshape(delta.shape))


def sign_consensus(weighted: torch.Tensor) -> torch.Tensor:
    """TIES sign election: per entry, the sign of the summed weighted deltas (ties count as +).

    `weighted` is [models, ...]; returns a bool mask of the same shape. Zeros never agree.
    """
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    return weighted.sign() == majority
