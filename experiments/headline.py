"""The headline table: parents, untuned merges, PS search over 3 seeds, the joint reference.

    python experiments/headline.py [--seeds 0,1,2] [--budget 480] [--out experiments/results]

Each seed runs the demo search (configs/demo.yaml with cma.seed = seed) to its budget, then the
best recipe of each is scored on the held-out split beside the parents, the untuned merges of
`evomerge export` and the reference fine-tuned on all skills jointly. Prints a markdown table
(mean and spread over seeds for the searched rows).
DFS (configs/demo_dfs.yaml) and PS+DFS (configs/demo_ps_dfs.yaml, over the same seed's PS
result) run with the same seeds and budgets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from evomerge.search import env  # noqa: E402

env.apply()


def main() -> None:
    from evomerge.fitness.models import load_model, model_from_recipe
    from evomerge.fitness.scorer import Scorer
    from evomerge.fitness.tasks import to_split
    from evomerge.fitness.zoo.build import build_zoo
    from evomerge.merge.recipe import Recipe
    from evomerge.search.config import SearchConfig
    from evomerge.search.demo import DEMO_CONFIG
    from evomerge.search.driver import run_search
    from evomerge.search.space import space_for
    from evomerge.search.rundir import RunDir
    from evomerge.search.workers import make_executor

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=int, default=480)
    ap.add_argument("--out", type=Path, default=Path("experiments/results/headline"))
    args = ap.parse_args()
    zoo = build_zoo(size="demo")
    os.environ.setdefault("HF_DATASETS_CACHE", str(zoo / ".hf-datasets"))
    base_cfg = SearchConfig.load(DEMO_CONFIG)
    configs = DEMO_CONFIG.parent
    kinds = {
        "ps": DEMO_CONFIG,
        "dfs": configs / "demo_dfs.yaml",
        "psdfs": configs / "demo_ps_dfs.yaml",
    }
    runs: dict[str, dict[int, RunDir]] = {k: {} for k in kinds}
    for seed in (int(s) for s in args.seeds.split(",")):
        for kind, config_path in kinds.items():
            data = SearchConfig.load(config_path).dump()
            data["cma"] |= {"seed": seed}
            if kind == "ps":
                data["cma"]["budget"] = args.budget
            if kind == "psdfs":
                data["dfs"]["ps_recipe"] = str(runs["ps"][seed].path)
            cfg = SearchConfig.parse(data)
            path = args.out / f"{kind}-seed{seed}"
            run = (
                RunDir.reopen(path, cfg)
                if (path / "run.yaml").exists()
                else RunDir.create(path, cfg)
            )
            t0 = time.perf_counter()
            best = run_search(run, lambda cfg=cfg: make_executor(cfg))
            print(
                f"{kind} seed {seed}: search best {best['fitness']:.4f} in "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
            runs[kind][seed] = run

    any_run = next(iter(runs["ps"].values()))
    specs = base_cfg.fitness.heldout_tasks or to_split(base_cfg.fitness.tasks, "heldout")
    scorer = Scorer(specs, include_paths=base_cfg.include_paths(), batch_size=100)

    def score(source) -> dict[str, float]:
        model, tok = model_from_recipe(source) if isinstance(source, Recipe) else load_model(source)
        r = scorer.bind(model, tok).score()
        return {**{k.split("/")[0]: v for k, v in r.metrics.items()}, "objective": r.fitness}

    rows: dict[str, list[dict]] = {}
    for alias in base_cfg.models:
        rows[f"parent: {alias}"] = [score(base_cfg.model_path(alias))]
    for label, recipe in space_for(any_run.config).baselines().items():
        rows[f"untuned: {label}"] = [score(recipe)]
    labels = {
        "ps": "PS search (TIES, per-layer genes)",
        "dfs": "DFS search (add, caps layers)",
        "psdfs": "PS+DFS search (over the PS result)",
    }
    for kind, label in labels.items():
        rows[label] = [
            score(Recipe.load(r.path / "best" / "recipe.yaml")) for r in runs[kind].values()
        ]
    rows["reference: joint fine-tune on all skills"] = [score(zoo / "llama" / "joint")]

    cols = list(next(iter(rows.values()))[0])
    short = [c.removeprefix("zoo_").removesuffix("_heldout") for c in cols]
    print("| model | " + " | ".join(short) + " |\n|---|" + "---:|" * len(cols))
    for label, results in rows.items():
        cells = []
        for c in cols:
            values = [r[c] for r in results]
            mean = statistics.mean(values)
            cells.append(
                f"{mean:.3f}"
                if len(values) == 1
                else f"{mean:.3f} ± {statistics.pstdev(values):.3f}"
            )
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
