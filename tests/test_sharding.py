"""Sharded fitness: shards combine to the unsharded score, exactly, for mean metrics."""

from __future__ import annotations

import pytest

from evomerge.fitness.models import load_model
from evomerge.fitness.scorer import Scorer, combine_shards
from evomerge.fitness.tasks import TaskSpec
from evomerge.search.loop.driver import Progress, run_search
from evomerge.search.loop.workers import RayExecutor, SerialExecutor
from evomerge.search.run.rundir import RunDir
from tests.conftest import search_config

SPECS = [TaskSpec(name="zoo_add_gen_search"), TaskSpec(name="zoo_caps_mc_search", weight=2.0)]


@pytest.mark.parametrize("k", [2, 3, 7])
def test_shards_combine_to_the_unsharded_score(tiny_zoo, k):
    scorer = Scorer(SPECS, include_paths=[tiny_zoo / "tasks"], limit=30, batch_size=16)
    model, tok = load_model(tiny_zoo / "llama" / "caps")
    scorer.bind(model, tok)
    whole = scorer.score()
    parts = [scorer.score(scorer.shard(i, k)) for i in range(k)]
    assert sum(p.examples for p in parts) == whole.examples == 60
    combined = combine_shards(scorer.specs, parts)
    assert combined.metrics == pytest.approx(whole.metrics, abs=1e-12)
    assert combined.fitness == pytest.approx(whole.fitness, abs=1e-12)
    assert scorer.shardable


def test_non_mean_aggregation_is_not_shardable(tiny_zoo, tmp_path):
    (tmp_path / "median.yaml").write_text(
        (tiny_zoo / "tasks" / "zoo_add_gen_search.yaml")
        .read_text()
        .replace("task: zoo_add_gen_search", "task: zoo_add_median")
        .replace("include: _zoo_gen.yaml", f"include: {tiny_zoo / 'tasks' / '_zoo_gen.yaml'}")
        + "metric_list:\n  - metric: exact_match\n    aggregation: median\n    higher_is_better: true\n"
    )
    scorer = Scorer([TaskSpec(name="zoo_add_median")], include_paths=[tmp_path, tiny_zoo / "tasks"])
    assert not scorer.shardable


@pytest.mark.ray
def test_more_workers_than_candidates_shards_and_scores_the_same(tiny_zoo, tmp_path):
    import ray

    cma = {"popsize": 2, "budget": 4, "seed": 5, "sigma0": 0.4}
    serial_cfg = search_config(tiny_zoo, cma=cma)
    serial = RunDir.create(tmp_path / "serial", serial_cfg)
    run_search(serial, lambda: SerialExecutor(serial_cfg), Progress())
    cfg = search_config(tiny_zoo, cma=cma, workers={"count": 4, "cpus_per_worker": 1})
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        run = RunDir.create(tmp_path / "sharded", cfg)
        run_search(run, lambda: RayExecutor(cfg), Progress())
    finally:
        ray.shutdown()
    sharded, reference = run.trials(), serial.trials()
    assert len(sharded) == 4
    for key, t in sharded.items():
        assert t["status"] == "COMPLETE"
        assert len(t["worker"].split(",")) == 2  # two shards, on two workers
        assert t["fitness"] == pytest.approx(reference[key]["fitness"], abs=1e-12)
        assert t["metrics"] == pytest.approx(reference[key]["metrics"], abs=1e-12)


@pytest.mark.ray
def test_racing_on_more_workers_than_candidates_decides_as_serially(tiny_zoo, tmp_path):
    """Racing with sharding on (chunks take the shards' place) and 4 Ray workers for 2
    candidates: the same decisions and told fitness as a serial racing search; a candidate
    raced to its last chunk has full evaluation's score (its chunks' per-item scores add up to
    the lm-eval metrics of every item)."""
    import ray

    cma = {"popsize": 2, "budget": 4, "seed": 5, "sigma0": 0.4}
    racing = {"enabled": True, "chunks": 3, "first_chunk": 0.34, "confidence": 1, "tolerance": 0}
    fitness = search_config(tiny_zoo).fitness.model_dump()
    full_cfg = search_config(tiny_zoo, cma=cma | {"active": False})
    full = RunDir.create(tmp_path / "full", full_cfg)
    run_search(full, lambda: SerialExecutor(full_cfg), Progress())
    serial_cfg = search_config(tiny_zoo, cma=cma, fitness=fitness | {"racing": racing})
    serial = RunDir.create(tmp_path / "serial", serial_cfg)
    run_search(serial, lambda: SerialExecutor(serial_cfg), Progress())
    cfg = search_config(
        tiny_zoo,
        cma=cma,
        fitness=fitness | {"racing": racing, "shards": "auto"},
        workers={"count": 4, "cpus_per_worker": 1},
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        run = RunDir.create(tmp_path / "raced", cfg)
        run_search(run, lambda: RayExecutor(cfg), Progress())
    finally:
        ray.shutdown()
    raced, reference, truth = run.trials(), serial.trials(), full.trials()
    assert sorted(raced) == sorted(reference) == sorted(truth)
    for key, t in raced.items():
        assert t["status"] == "COMPLETE"
        assert t["fitness"] == reference[key]["fitness"]
        assert {**t["race"], "scored": 0} == {**reference[key]["race"], "scored": 0}
        assert t["x"] == truth[key]["x"]
        if t["race"]["decision"] == "full":
            assert t["fitness"] == pytest.approx(truth[key]["fitness"], abs=1e-12)
            assert t["metrics"] == pytest.approx(truth[key]["metrics"], abs=1e-12)
