"""Where a search's time goes, and what materializing a candidate costs.

    python experiments/bench_search.py [--budget 96] [--params 100e6]

Part 1: the demo search (demo zoo, TIES, serial worker so the split is exact) from start to end:
wall time split into worker start-up, materialize (merge into the resident model), evaluate
(lm-eval), and everything else (optimizer, journal, fsync, snapshots, decode): the overhead.
Part 2 (`--only materialize [--methods ...] [--models DIR] [--threads N]`): in-memory
materialization of one candidate on a generated Llama of --params parameters, beside one plain
copy of the model's bytes (param.copy_ from resident tensors), interleaved, fastest of --repeats.
Part 3 (`--only from-recipe --models DIR`): `eval --recipe`'s model built in memory beside
`eval --model`'s load of the same merge written to disk.
Part 4 (`--only utilization [--workers 4] [--popsize 2]`): worker utilization over 6
generations on Ray workers that outnumber the candidates, with sharding off, sharding auto, and
racing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from evomerge.search import env  # noqa: E402

env.apply()

import torch  # noqa: E402


def search_split(budget: int) -> None:
    from evomerge.fitness.zoo.build import build_zoo
    from evomerge.search.cli.demo import DEMO_CONFIG
    from evomerge.search.config import SearchConfig
    from evomerge.search.loop.driver import run_search
    from evomerge.search.loop.workers import SerialExecutor
    from evomerge.search.run.rundir import RunDir

    build_zoo(size="demo")
    data = SearchConfig.load(DEMO_CONFIG).dump()
    data["cma"]["budget"] = budget
    data["workers"]["count"] = 0
    cfg = SearchConfig.parse(data)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "hf")
        run = RunDir.create(Path(tmp) / "run", cfg)
        startup = [0.0]

        def factory():
            t = time.perf_counter()
            ex = SerialExecutor(cfg)
            startup[0] = time.perf_counter() - t
            return ex

        t0 = time.perf_counter()
        run_search(run, factory)
        wall = time.perf_counter() - t0
        done = [r for r in run.records() if r.get("status") in ("COMPLETE", "FAILED")]
    merge = sum(r["merge_seconds"] for r in done)
    evaluate = sum(r["eval_seconds"] for r in done)
    searching = wall - startup[0]
    other = searching - merge - evaluate
    print(f"search: {len(done)} trials, wall {wall:.1f} s (worker start-up {startup[0]:.1f} s)")
    print(
        f"  materialize {merge:.2f} s ({100 * merge / searching:.1f} %), "
        f"evaluate {evaluate:.2f} s ({100 * evaluate / searching:.1f} %), "
        f"everything else {other:.2f} s -> overhead {100 * other / searching:.2f} % "
        f"of the time after start-up"
    )
    print(
        f"  per trial: materialize {1000 * merge / len(done):.1f} ms, "
        f"evaluate {1000 * evaluate / len(done):.0f} ms, other {1000 * other / len(done):.1f} ms"
    )


def two_expert_recipe(method: str, paths: dict[str, Path], layers: int):
    """One group over every layer, each expert given only the parameters `method` declares."""
    from evomerge.merge.ops.registry import get_method
    from evomerge.merge.recipe import Recipe

    declared = {p.name for p in get_method(method).model_params}
    given = {"expert1": {"weight": 0.6, "density": 0.5}, "expert2": {"weight": 0.4, "density": 0.5}}
    params = {a: {k: v for k, v in p.items() if k in declared} for a, p in given.items()}
    return Recipe.parse(
        {
            "dtype": "float32",
            "models": {a: {"path": str(p)} for a, p in paths.items()},
            "parameter_space": {
                "method": method,
                "base": "base",
                "groups": [{"layers": [0, layers], "params": params}],
            },
        }
    )


def materialize_vs_copy(
    params: float, methods: list[str], models: Path | None, repeats: int
) -> None:
    """Each method's materialize beside one plain copy of the model's bytes, interleaved, the
    fastest of `repeats` each; the family is written under `models` (or reused from there)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.merge.resident import ResidentSources
    from evomerge.merge.synthetic import make_family

    hidden = 1024
    layers = max(1, round((params - 2 * 32000 * hidden) / (4 * hidden**2 + 3 * hidden * 2816)))
    with tempfile.TemporaryDirectory() as tmp:
        root = models or Path(tmp)
        paths = {a: root / a for a in ("base", "expert1", "expert2")}
        if not (root / "expert2" / "model.safetensors").exists():
            paths = make_family(
                root,
                "llama",
                experts=2,
                hidden_size=hidden,
                intermediate_size=2816,
                num_hidden_layers=layers,
                num_attention_heads=16,
                num_key_value_heads=16,
                vocab_size=32000,
                tie_word_embeddings=False,
            )
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(paths["base"], trust_remote_code=False)
        )
        n = sum(p.numel() for p in model.parameters())
        params_by_name = dict(model.named_parameters())
        print(
            f"materialize: {n / 1e6:.0f}M parameters, 2 experts, fp32, CPU, torch threads "
            f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        for method in methods:
            recipe = two_expert_recipe(method, paths, layers)
            sources = ResidentSources(paths, "base", "cpu")
            src = sources.models["base"].tensors
            copies, merges = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                with torch.no_grad():
                    for name, p in params_by_name.items():
                        p.copy_(src[name])
                copies.append(time.perf_counter() - t)
                t = time.perf_counter()
                sources.materialize(recipe, model)
                merges.append(time.perf_counter() - t)
            copy_s, merge_s = min(copies), min(merges)
            print(
                f"materialize {method}: {merge_s:.3f} s per candidate "
                f"({sources.workers.threads} merge threads); one plain copy {copy_s:.3f} s "
                f"-> {merge_s / copy_s:.1f}x a copy; load average {os.getloadavg()[0]:.2f}",
                flush=True,
            )
            sources.workers.close()
            del sources


def utilization(workers: int, popsize: int, generations: int) -> None:
    """Busy time / wall time of the workers when they outnumber the candidates in flight, over
    the generations: every result's busy seconds (materialize + evaluate, as its worker reports
    them; a racing chunk dropped or cancelled because its candidate stopped included, as far
    as it ran), clipped to the span from the first candidate asked to the last one finished,
    over workers x that span. Also the share of that busy time whose results were used."""
    import ray

    from evomerge.search.cli.demo import DEMO_CONFIG
    from evomerge.search.config import SearchConfig
    from evomerge.search.loop.driver import run_search
    from evomerge.search.loop.workers import RayExecutor
    from evomerge.search.run.rundir import RunDir

    class Timed(RayExecutor):
        """Remembers when each result came back, how long its worker was busy on it, and
        whether it was used."""

        def __init__(self, config):
            super().__init__(config)
            self.results: list[tuple[float, float, bool]] = []

        def arrived(self, trial, result, wanted):
            busy = result.merge_seconds + result.eval_seconds
            self.results.append((time.time(), busy, wanted))

    data = SearchConfig.load(DEMO_CONFIG).dump()
    data["cma"] |= {"popsize": popsize, "budget": popsize * generations}
    data["workers"] |= {"count": workers, "cpus_per_worker": 1}
    # sharding off, auto, and racing at the default shards: auto (a chunk is split into pieces
    # when workers outnumber the candidates still racing)
    for shards, racing in (("off", False), ("auto", False), ("auto", True)):
        data["fitness"]["shards"] = shards
        data["fitness"]["racing"] = {"enabled": racing}
        cfg = SearchConfig.parse(data)
        # logical CPUs: on a small machine the workers share cores, but idle time is still idle
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory() as tmp:
            run = RunDir.create(Path(tmp) / "run", cfg)
            executors: list[Timed] = []

            def factory(cfg=cfg, executors=executors):
                ex = Timed(cfg)
                ex.wait_ready()
                executors.append(ex)
                return ex

            run_search(run, factory)
            records = run.records()
        ray.shutdown()
        # the generations alone (what sharding and racing change): from the first candidate
        # asked to the last one finished, by the journal's times; the parents scored before and
        # the best rescored after are a handful of whole trials on more workers than them
        start = min(r["time"] for r in records if r.get("status") == "ASKED")
        end = max(r["time"] for r in records if r.get("status") == "COMPLETE")
        busy = used = 0.0
        for arrived, seconds, wanted in executors[0].results:
            inside = max(0.0, min(arrived, end) - max(arrived - seconds, start))
            busy += inside
            used += inside if wanted else 0.0
        span = end - start
        mode = "racing" if racing else f"sharding {shards}"
        print(
            f"utilization, {workers} workers, {popsize} candidates per generation, {mode}: "
            f"generations {100 * busy / (workers * span):.0f} % (busy {busy:.1f} s over "
            f"{workers} x {span:.1f} s; {100 * used / max(busy, 1e-9):.0f} % of it used); load "
            f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
            flush=True,
        )


def from_recipe(methods: list[str], models: Path, repeats: int) -> None:
    """`eval --recipe` against `eval --model`: the model built from the recipe in memory
    (fitness.models.model_from_recipe) beside the merged checkpoint loaded
    (fitness.models.load_model), on the --models family (written by --only materialize)."""
    from evomerge.fitness import models as fm
    from evomerge.merge.engine import merge_to_dir
    from evomerge.merge.io.checkpoint import Checkpoint

    fm.load_tokenizer = lambda path: None  # the generated family has no tokenizer
    paths = {a: models / a for a in ("base", "expert1", "expert2")}
    layers = Checkpoint(paths["base"]).info.num_layers
    for method in methods:
        recipe = two_expert_recipe(method, paths, layers)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            merge_to_dir(recipe, Path(tmp) / "m")
            merge_s = time.perf_counter() - t
            loads, builds = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                loaded, _ = fm.load_model(Path(tmp) / "m")
                loads.append(time.perf_counter() - t)
                t = time.perf_counter()
                built, _ = fm.model_from_recipe(recipe)
                builds.append(time.perf_counter() - t)
                del loaded, built
        print(
            f"from recipe {method}: model_from_recipe {min(builds):.2f} s, load_model of the merged "
            f"checkpoint {min(loads):.2f} s (lazy: safetensors maps the file), merge_to_dir "
            f"{merge_s:.2f} s; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument(
        "--only", choices=["split", "materialize", "from-recipe", "utilization"], default=None
    )
    ap.add_argument("--methods", default="linear,task_arithmetic,ties", help="materialize")
    ap.add_argument("--models", type=Path, help="materialize: write (or reuse) the family here")
    ap.add_argument("--repeats", type=int, default=5, help="materialize: runs, the fastest kept")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--workers", type=int, default=4, help="utilization: Ray workers")
    ap.add_argument("--popsize", type=int, default=2, help="utilization: candidates per generation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.only in (None, "split"):
        search_split(args.budget)
    if args.only in (None, "materialize"):
        materialize_vs_copy(args.params, args.methods.split(","), args.models, args.repeats)
    if args.only == "from-recipe":
        if args.models is None:
            raise SystemExit("--only from-recipe needs --models DIR (see --only materialize)")
        from_recipe(args.methods.split(","), args.models, args.repeats)
    if args.only in (None, "utilization"):
        utilization(workers=args.workers, popsize=args.popsize, generations=6)
    print(json.dumps({"machine": f"{os.cpu_count()} CPU cores", "torch": torch.__version__}))


if __name__ == "__main__":
    main()
