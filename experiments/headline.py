"""The headline table: does the evolved merge beat every parent and every hand-made merge?

    python experiments/headline.py [--seeds 0,1,2] [--out experiments/results/headline]

Per seed: the PS demo search (configs/demo.yaml: task arithmetic, per-layer weights), random
search at the same budget and population (cma.sampler: random), the DFS demo
(configs/demo_dfs.yaml) and PS+DFS over that seed's PS winner (configs/demo_ps_dfs.yaml). Each
winner (`RunDir.ranked`: the best after the final rescoring) is scored on the held-out split
beside the parents, the untuned merges a user would try by hand (over the whole pool, and
without the distractor), and the reference fine-tuned jointly on every skill. Prints a markdown
table (mean ± population std over seeds for searched rows), then the curve of the best
held-out mean against evaluations for CMA-ES and random search (the best-so-far trial by search
fitness at each generation's end), also drawn to <out>/curve.png. Runs are reused if present.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from evomerge.search import env

env.apply()


def main() -> None:
    from evomerge.fitness.models import load_model, model_from_recipe
    from evomerge.fitness.scorer import Scorer
    from evomerge.fitness.tables import markdown_table
    from evomerge.fitness.zoo.build import build_zoo
    from evomerge.fitness.zoo.skills import DISTRACTOR
    from evomerge.merge.recipe import Recipe
    from evomerge.search.cli.demo import DEMO_CONFIG
    from evomerge.search.config import SearchConfig
    from evomerge.search.loop.driver import run_search
    from evomerge.search.loop.workers import make_executor
    from evomerge.search.plots import pyplot, save
    from evomerge.search.run.rundir import RunDir
    from evomerge.search.spaces import space_for

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/headline"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    zoo = build_zoo(size="demo")
    configs = DEMO_CONFIG.parent
    kinds = {
        "ps": DEMO_CONFIG,
        "random": DEMO_CONFIG,
        "dfs": configs / "demo_dfs.yaml",
        "psdfs": configs / "demo_ps_dfs.yaml",
    }
    runs: dict[str, dict[int, RunDir]] = {k: {} for k in kinds}
    for seed in seeds:
        for kind, config_path in kinds.items():
            data = SearchConfig.load(config_path).dump()
            data["cma"] |= {"seed": seed, "sampler": "random" if kind == "random" else "cmaes"}
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
            assert best is not None, f"{kind} seed {seed}: no trial completed"
            print(
                f"{kind} seed {seed}: winner {best['generation']}:{best['index']} search "
                f"{best['fitness']:.4f} in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
            runs[kind][seed] = run

    base_cfg = SearchConfig.load(DEMO_CONFIG)
    specs = base_cfg.heldout_specs()
    tasks = [s.name for s in specs]
    scorer = Scorer(specs, include_paths=base_cfg.include_paths(), batch_size=100, part="heldout")
    cache: dict[str, dict[str, float]] = {}

    def score(source: Recipe | Path) -> dict[str, float]:
        key = source.to_yaml() if isinstance(source, Recipe) else str(source)
        if key not in cache:
            model, tok = (
                model_from_recipe(source) if isinstance(source, Recipe) else load_model(source)
            )
            r = scorer.bind(model, tok).score()
            assert r.ok, r.error
            metrics = {k.split("/")[0]: v for k, v in r.metrics.items()}
            cache[key] = {**metrics, "mean": sum(metrics[t] for t in tasks) / len(tasks)}
        return cache[key]

    rows: dict[str, list[dict]] = {}
    for alias in base_cfg.models:
        rows[f"parent: {alias}"] = [score(base_cfg.model_path(alias))]
    space = space_for(base_cfg)
    useful = [e for e in base_cfg.experts if e != DISTRACTOR]
    for label, recipe in space.baselines().items():
        rows[f"untuned: {label}"] = [score(recipe)]
    for label, recipe in space.baselines(useful).items():
        rows[f"untuned: {label}, without {DISTRACTOR}"] = [score(recipe)]
    labels = {
        "ps": "PS search (CMA-ES, task arithmetic, per-layer weights)",
        "random": "random search (same genome, budget, population)",
        "dfs": "DFS search (script, add, caps layers)",
        "psdfs": "PS+DFS search (over the PS winner)",
    }
    for kind, label in labels.items():
        rows[label] = [score(Recipe.parse(r.ranked()[0]["recipe"])) for r in runs[kind].values()]
    rows["reference: joint fine-tune on every skill"] = [score(zoo / "llama" / "joint")]

    short = {t: t.removeprefix("zoo_").removesuffix("_heldout") for t in tasks}
    table = []
    for label, results in rows.items():
        row: dict[str, object] = {"model": label}
        for c in [*tasks, "mean"]:
            values = [r[c] for r in results]
            mean = statistics.mean(values)
            row[short.get(c, c)] = (
                f"{mean:.3f}"
                if len(values) == 1
                else f"{mean:.3f} ± {statistics.pstdev(values):.3f}"
            )
        table.append(row)
    print(markdown_table(table))

    # the best-so-far trial (by search fitness) at each generation's end, scored held-out
    curves: dict[str, dict[int, list[float]]] = {"ps": {}, "random": {}}
    for kind in curves:
        for run in runs[kind].values():
            trials = sorted(run.trials().values(), key=lambda t: (t["generation"], t["index"]))
            best = None
            for done, t in enumerate(trials, start=1):
                if t["status"] == "COMPLETE" and (best is None or t["fitness"] > best["fitness"]):
                    best = t
                last_of_generation = t["index"] == run.config.cma.popsize - 1
                if best is not None and last_of_generation:
                    held = score(Recipe.parse(best["recipe"]))["mean"]
                    curves[kind].setdefault(done, []).append(held)
    evals = sorted(set(curves["ps"]) & set(curves["random"]))
    print("\n| evaluations | CMA-ES best held-out mean | random search |\n|---:|---:|---:|")
    for n in evals[1::2] if len(evals) > 10 else evals:
        ps, rnd = statistics.mean(curves["ps"][n]), statistics.mean(curves["random"][n])
        print(f"| {n} | {ps:.3f} | {rnd:.3f} |")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind, name in (("ps", "CMA-ES"), ("random", "random search")):
        ax.plot(evals, [statistics.mean(curves[kind][n]) for n in evals], label=name)
    best_parent = max(r[0]["mean"] for label, r in rows.items() if label.startswith("parent"))
    ax.axhline(best_parent, color="grey", linestyle="--", label="best parent")
    ax.set_xlabel("evaluations")
    ax.set_ylabel(f"held-out mean (best so far, {len(seeds)} seeds)")
    ax.legend(loc="lower right")
    save(fig, args.out / "curve.png")
    print(f"\ncurve: {args.out / 'curve.png'}")


if __name__ == "__main__":
    main()
