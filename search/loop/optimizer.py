"""CMA-ES ask/tell over `cma.CMAEvolutionStrategy`, maximizing fitness, reproducibly.

Every `ask` draws from numpy's global generator seeded from (run seed, generation), through a
module-level `randn` (cma's default is a bound method that carries a private copy of the
generator). So a strategy is a pure function of its construction and the fitness values it is
told, and replaying the journal rebuilds it: no optimizer state is ever saved.
"""

from __future__ import annotations

import cma
import numpy as np


def global_randn(*shape: int) -> np.ndarray:
    return np.random.randn(*shape)


class Optimizer:
    def __init__(
        self,
        x0: np.ndarray,
        sigma0: float,
        bounds: tuple[list[float], list[float]],
        seed: int,
        popsize: int | None = None,
        diagonal: bool = False,
        active: bool = True,
    ):
        """`active`: active CMA (negative recombination weights for the worst candidates:
        cma's default). Off, only the best half's ranks carry weight (racing needs no more)."""
        self.seed = seed
        self.generation = 0  # generations told so far
        # The budget decides when a search ends. Discrete metrics (exact match) are often flat
        # for whole generations, which cma's tolerance stops would take for convergence.
        opts: dict = {
            "randn": global_randn,
            "bounds": [bounds[0], bounds[1]],
            "verbose": -9,
            "CMA_diagonal": diagonal,
            "CMA_active": active,
            "tolflatfitness": 10**9,
            "tolfun": 0,
            "tolfunhist": 0,
            "tolstagnation": 10**9,
            "tolx": 0,
        }
        if popsize:
            opts["popsize"] = popsize
        np.random.seed(self._generation_seed(0))
        self.es = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=float), sigma0, opts)

    @property
    def popsize(self) -> int:
        return int(self.es.popsize)

    @property
    def mu(self) -> int:
        """How many of a generation's best carry positive recombination weights."""
        return int(self.es.sp.weights.mu)

    def _generation_seed(self, generation: int) -> int:
        return (self.seed * 1_000_003 + generation * 7919 + 17) % (2**32)

    def ask(self) -> list[np.ndarray]:
        np.random.seed(self._generation_seed(self.generation + 1))
        return [np.asarray(x, dtype=float) for x in self.es.ask()]

    def tell(self, xs: list[np.ndarray], fitness: list[float]) -> None:
        """Fitness is maximized; cma minimizes: the one place the sign flips."""
        self.es.tell(xs, [-f for f in fitness])
        self.generation += 1

    def stop(self) -> dict:
        return dict(self.es.stop())


class RandomSearch:
    """Uniform samples in the genome's box, as many per generation as CMA-ES would ask: the
    baseline a search must beat at equal budget. Same seeds, same journal, same resume."""

    def __init__(
        self,
        x0: np.ndarray,
        sigma0: float,
        bounds: tuple[list[float], list[float]],
        seed: int,
        popsize: int | None = None,
        diagonal: bool = False,
        active: bool = True,
    ):
        x0 = np.asarray(x0, dtype=float)
        lo, hi = np.asarray(bounds[0], dtype=float), np.asarray(bounds[1], dtype=float)
        # an unbounded gene (a sigmoid transform's logit) is drawn within 4 of its start
        self.lo = np.where(np.isfinite(lo), lo, x0 - 4)
        self.hi = np.where(np.isfinite(hi), hi, x0 + 4)
        self.seed = seed
        self.popsize = popsize or 4 + int(3 * np.log(max(len(x0), 1)))
        self.mu = 1  # only a generation's best can be the search's best
        self.generation = 0

    def ask(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.generation + 1])
        return [rng.uniform(self.lo, self.hi) for _ in range(self.popsize)]

    def tell(self, xs: list[np.ndarray], fitness: list[float]) -> None:
        self.generation += 1

    def stop(self) -> dict:
        return {}
