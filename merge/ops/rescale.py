"""How a sparsifier rescales the entries it keeps: a recipe option, read without torch.

It lives apart from merge.sparsify (which re-exports it, and whose functions read it) so that
the recipe schema and the method registry's declarations import no tensor library.
"""

from __future__ import annotations

from enum import Enum


class Rescale(str, Enum):
    """How kept entries are rescaled after dropping."""

    none = "none"
    inverse_density = "inverse_density"  # x / p: the DARE and DELLA papers
    l1 = "l1"  # match the L1 norm of the unmasked tensor: mergekit's behaviour
