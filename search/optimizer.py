"""CMA-ES ask/tell over `cma.CMAEvolutionStrategy`, maximizing fitness, with exact save/load.

cma samples through its `randn` option. Its default, the bound method `np.random.randn`, pickles
together with a private copy of the generator, so a restored strategy would sample from a stale
copy. We pass a module-level function instead (pickled by name, always the global generator) and
seed that generator from (run seed, generation) before every `ask`: a strategy restored from its
snapshot asks exactly what the uninterrupted one would have asked.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

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
    ):
        self.seed = seed
        self.generation = 0  # generations told so far
        # The budget decides when a search ends. Discrete metrics (exact match) are often flat
        # for whole generations, which cma's tolerance stops would take for convergence.
        opts: dict = {
            "randn": global_randn,
            "bounds": [bounds[0], bounds[1]],
            "verbose": -9,
            "CMA_diagonal": diagonal,
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

    def save(self, path: Path) -> None:
        """Atomically: a temporary file, fsync'd, then renamed into place."""
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump(self, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path) -> Optimizer:
        with open(path, "rb") as f:
            opt = pickle.load(f)
        if not isinstance(opt, Optimizer):
            raise ValueError(f"{path} is not an optimizer snapshot")
        return opt
