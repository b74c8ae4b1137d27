"""Racing against full evaluation: the demo search at the same budget, per seed.

    python experiments/bench_racing.py [--seeds 0 1 2] [--modes full racing] [--out DIR]
                                       [--set confidence=0.9 tolerance=2 ...] [--budget N]

For each seed, the demo search (configs/demo.yaml: 360 evaluations, 2 Ray workers) with every
candidate scored on every item (`full`), and with racing (`racing`: configs/demo.yaml plus
`fitness.racing.enabled`, its defaults otherwise). `full-passive` is full evaluation with active
CMA off, the optimizer racing runs (to see what turning active updates off costs by itself).
Prints per seed and mode the search items scored (every chunk a worker scored, wasted ones
included) against the items full evaluation scores, the wall time, and the held-out mean of the
winner (the search's best after the final rescoring, scored on every held-out item). Ends with:

    racing: examples scored R of full; held-out A (racing) vs B (full), N seeds

Runs live in --out (default runs/bench_racing/), one directory per seed and mode; an interrupted
bench resumes them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from evomerge.search import env  # noqa: E402

env.apply()
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def config_for(seed: int, mode: str, racing: dict | None = None, budget: int | None = None):
    from evomerge.search.cli.demo import DEMO_CONFIG
    from evomerge.search.config import SearchConfig

    data = SearchConfig.load(DEMO_CONFIG).dump()
    data["cma"]["seed"] = seed
    if budget:  # smoke runs only: the reported figures use the demo's own budget
        data["cma"]["budget"] = budget
    if mode == "racing":
        data["fitness"]["racing"] = {"enabled": True, **(racing or {})}
    elif mode == "full-passive":
        data["cma"]["active"] = False
    return SearchConfig.parse(data)


def items(run) -> tuple[int, int]:
    """(items scored, items full evaluation scores) over the search's trials."""
    scored = full = 0
    for t in run.trials().values():
        if t.get("status") not in ("COMPLETE", "FAILED"):
            continue
        race = t.get("race")
        scored += race["scored"] if race else t.get("examples") or 0
        full += race["of"] if race else t.get("examples") or 0
    return scored, full


def heldout_mean(run, best: dict) -> float:
    """The winner's held-out objective: every held-out item (never raced)."""
    from evomerge.fitness.models import model_from_recipe
    from evomerge.fitness.scorer import Scorer
    from evomerge.merge.recipe import Recipe

    cfg = run.config
    scorer = Scorer(
        cfg.heldout_specs(),
        include_paths=cfg.include_paths(),
        batch_size=cfg.fitness.batch_size,
        part="heldout",
    )
    model, tok = model_from_recipe(Recipe.parse(best["recipe"]))
    result = scorer.bind(model, tok).score()
    assert result.ok, result.error
    return result.fitness


def one(seed: int, mode: str, out: Path, racing: dict, budget: int | None) -> dict:
    from evomerge.search.cli.console import ensure_zoo
    from evomerge.search.loop.driver import run_search
    from evomerge.search.loop.workers import make_executor
    from evomerge.search.run.rundir import RunDir

    cfg = config_for(seed, mode, racing, budget)
    ensure_zoo(cfg)
    path = out / f"seed{seed}-{mode}"
    run = RunDir.reopen(path, cfg) if (path / "run.yaml").exists() else RunDir.create(path, cfg)
    start = time.perf_counter()
    best = run_search(run, lambda: make_executor(run.config))
    wall = time.perf_counter() - start
    assert best is not None
    scored, full = items(run)
    row = {
        "seed": seed,
        "mode": mode,
        "scored": scored,
        "full": full,
        "wall_s": round(wall, 1),
        "winner": f"{best['generation']}:{best['index']}",
        "heldout": heldout_mean(run, best),
        "load": os.getloadavg()[0],
    }
    print(
        f"seed {seed} {mode:12s} items scored {scored} of {full} ({scored / full:.3f}), "
        f"wall {wall:.0f} s, winner {row['winner']}, held-out mean {row['heldout']:.4f}, "
        f"load {row['load']:.1f}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modes", nargs="+", default=["full", "racing"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_racing"))
    ap.add_argument("--budget", type=int, help="smoke runs: fewer evaluations than the demo's")
    ap.add_argument("--set", nargs="*", default=[], help="racing settings, e.g. tolerance=2")
    args = ap.parse_args()
    racing = {k: float(v) if "." in v else int(v) for k, v in (a.split("=") for a in args.set)}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [
        one(seed, mode, args.out, racing, args.budget) for seed in args.seeds for mode in args.modes
    ]
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    by = {mode: [r for r in rows if r["mode"] == mode] for mode in args.modes}
    for mode, rs in by.items():
        mean = sum(r["heldout"] for r in rs) / len(rs)
        ratio = sum(r["scored"] for r in rs) / sum(r["full"] for r in rs)
        print(f"mode {mode}: items {ratio:.3f} of full, held-out mean {mean:.4f}, {len(rs)} seeds")
    if by.get("racing") and by.get("full"):
        racing, full = by["racing"], by["full"]
        ratio = sum(r["scored"] for r in racing) / sum(r["full"] for r in full)
        a = sum(r["heldout"] for r in racing) / len(racing)
        b = sum(r["heldout"] for r in full) / len(full)
        print(
            f"racing: examples scored {ratio:.2f} of full; held-out {a:.3f} (racing) vs "
            f"{b:.3f} (full), {len(racing)} seeds"
        )


if __name__ == "__main__":
    main()
