"""The reference merge methods, pure fp32 functions: they define the bits every path writes.

The math and the order of operations follow mergekit 0.1.5 (agreement to one unit in the last
place), so reordering an op here changes results.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.ops import sparsify


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool
) -> torch.Tensor:
    """Weighted average of the models (Wortsman et al. 2022, "Model soups")."""
    w = torch.tensor(list(weights), dtype=torch.float32, device=tensors[0].device)
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for x, wi in zip(tensors, w):
        out.addcmul_(x, wi)  # fp32 coefficients, fused: the rounding mergekit has
    if normalize:
        out.div_(w.sum())
    return out


def slerp(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from `base` (t=0) to `other` (t=1) over the whole tensor.

    The angle comes from the normalized tensors, the interpolation acts on the raw ones, and
    nearly collinear tensors (|cos| > 0.9995) fall back to linear interpolation (as mergekit).
    """
    a, b = base.reshape(-1).float(), other.reshape(-1).float()
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1.0)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1.0)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    tt = torch.tensor(t, dtype=torch.float32, device=a.device)
    # coefficients as fp32 tensors, as mergekit computes them, for agreement to the last place
    if dot.abs() > 0.9995:
        coef_a, coef_b = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        coef_a = torch.sin((1 - tt) * theta) / torch.sin(theta)
        coef_b = torch.sin(tt * theta) / torch.sin(theta)
    return (coef_a * a + coef_b * b).reshape(base.shape)


def combine_deltas(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """base + lambda * mix(w_i * d_i): task arithmetic (Ilharco et al. 2023) and its family.

    With `consensus`, TIES sign election (Yadav et al. 2023) keeps per entry only the weighted
    deltas that agree with the elected sign. With `normalize` the mix is divided per entry by the
    sum of the weights that took part (0 -> 1).
    """
    weighted = [d.float() * w for d, w in zip(deltas, weights)]
    mixed = torch.zeros_like(weighted[0])
    if consensus:
        # per model, not on a stacked [models, ...] tensor: no copy of all deltas at once
        sign = torch.where(sparsify.elect_positive(weighted), 1.0, -1.0)
        divisor = torch.zeros_like(mixed)
        for x, w in zip(weighted, weights):
            agree = (x * sign > 0).to(torch.float32)  # zeros never agree
            mixed.addcmul_(x, agree)
            divisor.add_(agree, alpha=w)
        divisor[divisor == 0] = 1
    else:
        for x in weighted:
            mixed += x
        total = torch.tensor(list(weights), dtype=torch.float32).sum()
        divisor = total if total.abs() >= 1e-8 else torch.ones(())
    if normalize:
        mixed /= divisor.to(mixed.device)
    if lambda_ != 1:
        mixed *= lambda_
    return base.float() + mixed
