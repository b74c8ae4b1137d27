"""Ray workers: a local Ray with 2 workers and injected faults, and a two-node cluster."""

from __future__ import annotations

import re
import time

import pytest

from evomerge.search.loop.driver import Progress, run_search
from evomerge.search.loop.workers import RayExecutor
from evomerge.search.run.rundir import RunDir
from evomerge.search.trial import Queue
from tests.conftest import search_config

pytestmark = pytest.mark.ray


@pytest.fixture
def ray_shutdown():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


def test_two_local_workers_survive_dead_and_hung_workers(tiny_zoo, tmp_path, ray_shutdown):
    cfg = search_config(
        tiny_zoo,
        workers={"count": 2, "cpus_per_worker": 1, "trial_timeout": 20},
        cma={"popsize": 4, "budget": 8, "seed": 3, "sigma0": 0.3},
    )
    faults = {"1:1": "die", "1:2": "hang", "2:0": "raise"}
    run = RunDir.create(tmp_path / "r", cfg)
    executors: list[RayExecutor] = []

    def make():
        executors.append(RayExecutor(cfg, faults))
        return executors[-1]

    best = run_search(run, make, Progress())
    trials = run.trials()
    assert len(trials) == 8 and best is not None
    assert trials[1, 1]["status"] == "FAILED" and "died twice" in trials[1, 1]["error"]
    assert trials[1, 2]["status"] == "FAILED" and "timeout" in trials[1, 2]["error"]
    assert trials[2, 0]["status"] == "FAILED" and "injected" in trials[2, 0]["error"]
    complete = [t for t in trials.values() if t["status"] == "COMPLETE"]
    assert len(complete) == 5
    # the worker that died (twice: its trial was retried once) and the hung one were replaced
    assert len(executors) == 1 and executors[0].replacements == 3
    # every start-up (the 2 workers, and the replacements that were ready in time) is logged
    # with its seconds and its sources' read speed
    started = re.findall(
        r"worker \S+ started in [\d.]+ s: sources [\d.]+ GB read in [\d.]+ s \([\d.]+ GB/s, "
        r"\d+ threads\) \(slot [12] of 2\)",
        (tmp_path / "r" / "search.log").read_text(),
    )
    assert 2 <= len(started) <= 5


@pytest.mark.slow
def test_two_node_cluster_runs_trials_on_both_nodes(tiny_zoo, tmp_path, ray_shutdown):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        cfg = search_config(
            tiny_zoo, workers={"count": 2, "cpus_per_worker": 1, "address": cluster.address}
        )
        run = RunDir.create(tmp_path / "r", cfg)
        executor = RayExecutor(cfg)
        # trials go only to started workers: under load one node's worker could still be loading
        # when the 12 trials are done; what this test checks is placement, so wait for both
        executor.wait_ready()
        run_search(run, lambda: executor, Progress())
        trials = run.trials()
        assert len(trials) == 12 and all(t["status"] == "COMPLETE" for t in trials.values())
        nodes = {t["worker"].rsplit(":node-", 1)[1] for t in trials.values()}
        assert len(nodes) == 2
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_removing_a_worker_node_mid_search_loses_no_trial(tiny_zoo, tmp_path, ray_shutdown):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    spare = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    removed: list[str] = []
    try:
        cfg = search_config(
            tiny_zoo,
            workers={
                "count": 2,
                "cpus_per_worker": 1,
                "address": cluster.address,
                "trial_timeout": 60,
            },
        )
        run = RunDir.create(tmp_path / "r", cfg)

        def remove_a_busy_node(done, record, best):
            if removed:
                return
            # a spare node whose worker has finished a trial (the head holds one worker at most;
            # early on, one worker may have finished every trial so far)
            busy = {
                t["worker"].rsplit(":node-", 1)[1] for t in run.trials().values() if t.get("worker")
            }
            victims = [n for n in spare if n.node_id[:8] in busy]
            if victims:
                cluster.remove_node(victims[0])
                removed.append((victims[0].node_id[:8], time.time()))

        run_search(run, lambda: RayExecutor(cfg), Progress(on_result=remove_a_busy_node))
        trials = run.trials()
        assert removed, "no worker node was removed"
        assert len(trials) == 12 and all(t["status"] == "COMPLETE" for t in trials.values())
        node, when = removed[0]
        late = [t for t in trials.values() if t["time"] > when]
        assert late and all(node not in t["worker"] for t in late)  # the removed node ran no more
    finally:
        cluster.shutdown()


@pytest.mark.parametrize(
    ("address", "env", "expected"),
    [
        (None, None, "local"),  # never the cluster `ray start` last left on this machine
        ("auto", None, "auto"),
        (None, "10.0.0.1:6379", "10.0.0.1:6379"),  # Ray's own variable is the user's choice
    ],
)
def test_ray_starts_its_own_instance_unless_told_where(
    tiny_zoo, monkeypatch, address, env, expected
):
    import ray

    seen: dict = {}

    class Stop(Exception):
        pass

    def init(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    cfg = search_config(tiny_zoo, workers={"count": 1, "address": address})
    with pytest.raises(Stop):
        RayExecutor(cfg)
    assert seen["address"] == expected
    # Ray refuses an object store size when it attaches to a running cluster
    assert ("object_store_memory" in seen) == (expected == "local")


class _RaceLike(Queue):
    """A feed that hands out a long and a short trial together and stops wanting the long one
    when the short one's result arrives (as a race drops a candidate's chunk on a result)."""

    def __init__(self, long, short):
        super().__init__([long, short])
        self.long, self.decided = long, False

    def wanted(self, trial):
        return trial is not self.long or not self.decided

    def on_result(self, trial, result):
        self.decided = True


def test_a_trial_nobody_wants_is_cancelled_and_not_waited_for(tiny_zoo, tmp_path, ray_shutdown):
    """The stream cancels a trial its feed stops wanting while it runs, and returns without
    waiting for it; its worker stops at its next batch, the result is dropped, and the worker
    takes the next trial (it is not replaced). A long trial (every item, one per batch) beside
    short ones, on two workers."""
    from evomerge.search.spaces import space_for
    from evomerge.search.trial import Trial

    cfg = search_config(
        tiny_zoo,
        workers={"count": 2, "cpus_per_worker": 1},
        fitness__limit=1,
        fitness__batch_size=1,
        fitness__rescore={"top": 1, "limit": None},
    )
    add = space_for(cfg).references()["add"]  # a parent as a recipe
    recipe = add.model_dump(mode="json", exclude_none=True)
    long, short = Trial(1, 0, recipe, items="rescore"), Trial(1, 1, recipe)
    executor = RayExecutor(cfg)
    executor.wait_ready()
    results: list = []
    start = time.perf_counter()
    executor.run([long], lambda t, r: results.append(r))
    whole = time.perf_counter() - start
    assert results[0].status == "COMPLETE"

    feed = _RaceLike(long, short)
    executor.stream(feed, feed.on_result)
    assert [r.trial for r in executor.running.values()] == [long]  # left running, cancelled
    assert next(iter(executor.running.values())).cancelled
    start = time.perf_counter()
    # two short trials: one waits for the long trial's worker
    executor.run([short, short], lambda t, r: results.append(r))
    freed = time.perf_counter() - start
    assert [r.status for r in results] == ["COMPLETE"] * 3  # the dropped one: never
    assert executor.replacements == 0 and not executor.running
    assert freed < whole / 2  # the cancelled trial stopped long before its end
    executor.shutdown()
