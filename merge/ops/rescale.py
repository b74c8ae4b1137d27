"""How a sparsifier rescales the entries it keeps: apart from `sparsify` so that the recipe and
the registry's declarations import no torch."""

from __future__ import annotations

from enum import Enum


class Rescale(str, Enum):
    """How kept entries are rescaled after dropping."""

    none = "none"
    inverse_density = "inverse_density"  # x / p: the DARE and DELLA papers
    l1 = "l1"  # match the L1 norm of the unmasked tensor: mergekit's behaviour
