"""CMA-ES ask/tell cost per generation at data-flow genome sizes (T + M^2 reaches thousands).

    python experiments/bench_optimizer.py [--dims 200,1000,2000,4000]

Full covariance costs O(n^2) memory and an O(n^3) eigendecomposition every few generations;
the separable (diagonal) variant is O(n). The search switches to diagonal above
`cma.diagonal_above` genes (default 400).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from evomerge.search.loop.optimizer import Optimizer  # noqa: E402


def per_generation(dim: int, diagonal: bool, generations: int) -> float:
    opt = Optimizer(np.zeros(dim), 0.3, ([-1.0] * dim, [1.0] * dim), seed=0, diagonal=diagonal)
    start = time.perf_counter()
    for _ in range(generations):
        xs = opt.ask()
        opt.tell(xs, [-float(np.sum(x**2)) for x in xs])
    return (time.perf_counter() - start) / generations


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="200,1000,2000,4000")
    ap.add_argument("--generations", type=int, default=5)
    args = ap.parse_args()
    print(f"{'genes':>6} {'popsize':>8} {'full s/gen':>11} {'diagonal s/gen':>15}")
    for dim in (int(d) for d in args.dims.split(",")):
        pop = 4 + int(3 * np.log(dim))
        full = per_generation(dim, False, args.generations) if dim <= 2000 else float("nan")
        diag = per_generation(dim, True, args.generations)
        print(f"{dim:>6} {pop:>8} {full:>11.3f} {diag:>15.4f}", flush=True)


if __name__ == "__main__":
    main()
