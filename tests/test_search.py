"""The search: genome, optimizer, run directory, resume equivalence, failures, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.merge.errors import EvomergeError
from evomerge.merge.recipe import Recipe
from evomerge.search.loop.driver import run_search
from evomerge.search.loop.optimizer import Optimizer
from evomerge.search.loop.workers import SerialExecutor
from evomerge.search.run.rundir import RunDir
from evomerge.search.spaces.parameter_space import ParameterSearch
from tests.conftest import Stop, search_config, stopping_after


def _run(path, cfg, faults=None, stop_after_results=None):
    run = RunDir.reopen(path, cfg) if (path / "run.yaml").exists() else RunDir.create(path, cfg)
    return run_search(run, lambda: SerialExecutor(cfg, faults), stopping_after(stop_after_results))


def _outcome(path):
    trials = RunDir.reopen(path).trials()
    return {
        k: (t["status"], round(t["fitness"], 12), tuple(np.round(t["x"], 12)))
        for k, t in sorted(trials.items())
    }


# -- genome ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    kinds=st.booleans(),
    per=st.integers(1, 3),
    eh=st.booleans(),
    method=st.sampled_from(["ties", "dare_ties", "linear", "breadcrumbs", "task_arithmetic"]),
)
def test_decode_encode_round_trip(tiny_zoo, data, kinds, per, eh, method):
    cfg = search_config(
        tiny_zoo,
        space={
            "method": method,
            "layers_per_group": per,
            "tensor_kinds": kinds,
            "embed_head_groups": eh,
        },
    )
    genome = ParameterSearch(cfg, num_layers=2)
    lo, hi = genome.bounds()
    # weights kept off zero: an all-zero group under normalize is refused (tested separately)
    x = np.array([data.draw(st.floats(max(a, 0.01), b)) for a, b in zip(lo, hi, strict=True)])
    recipe = genome.decode(x, seed=5)
    assert Recipe.parse(json.loads(recipe.model_dump_json(by_alias=True))) == recipe
    assert genome.decode(genome.encode(recipe), seed=5) == recipe
    assert np.array_equal(genome.encode(recipe), x)


def test_genome_layout_and_sigmoid_transform(tiny_zoo):
    cfg = search_config(
        tiny_zoo,
        space={
            "method": "dare_ties",
            "tensor_kinds": True,
            "ranges": {"density": {"low": 0.1, "high": 1.0, "init": 0.5, "transform": "sigmoid"}},
        },
    )
    g = ParameterSearch(cfg, num_layers=2)
    # embed + 2 layers x 3 kinds + head = 8 groups; 2 experts x (weight, density)
    assert len(g.groups) == 8 and g.dim == 32
    assert g.labels()[0] == "embed/add.weight" and "layers[1,2).mlp/caps.density" in g.labels()
    r = g.decode(np.full(g.dim, 50.0))
    assert r.parameter_space.groups[1].params["add"]["density"] == pytest.approx(1.0)
    x = g.encode(g.decode(g.x0()))
    assert np.allclose(x, g.x0())
    # the initial point decodes to the configured start
    start = g.decode(g.x0()).parameter_space.groups[0].params["caps"]
    assert start["weight"] == 0.5 and start["density"] == pytest.approx(0.5)


# -- optimizer ------------------------------------------------------------------------------


def test_optimizer_maximizes_and_replays_exactly():
    """A strategy rebuilt from its construction and the fitness values it was told (what the
    journal holds) asks exactly what the original asks next."""
    target = np.array([1.0, -0.5, 0.25])

    def fitness(x):
        return -float(np.sum((x - target) ** 2))

    opt = Optimizer(np.zeros(3), 0.5, ([-2] * 3, [2] * 3), seed=1, popsize=6)
    journal = []
    for _ in range(3):
        xs = opt.ask()
        journal.append([fitness(x) for x in xs])
        opt.tell(xs, journal[-1])
    replayed = Optimizer(np.zeros(3), 0.5, ([-2] * 3, [2] * 3), seed=1, popsize=6)
    for told in journal:
        replayed.tell(replayed.ask(), told)
    a, b = opt.ask(), replayed.ask()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    for _ in range(25):
        xs = opt.ask()
        opt.tell(xs, [-float(np.sum((x - target) ** 2)) for x in xs])
    assert np.linalg.norm(opt.es.result.xfavorite - target) < 0.1


# -- run directory --------------------------------------------------------------------------


RACING = {"enabled": True, "chunks": 4, "first_chunk": 0.25, "confidence": 0.5, "tolerance": 1}


@pytest.mark.parametrize("racing", [False, True], ids=["full", "racing"])
def test_resume_equivalence(tiny_zoo, tmp_path, racing):
    """2 generations, a kill, resume to 3 == 3 uninterrupted: same vectors, scores and best
    (with racing: real workers scoring chunks, and the same race fields journaled)."""
    cfg = search_config(tiny_zoo)
    if racing:
        cfg = search_config(tiny_zoo, fitness={**cfg.fitness.model_dump(), "racing": RACING})
    best_ref = _run(tmp_path / "ref", cfg)
    with pytest.raises(Stop):
        _run(tmp_path / "cut", cfg, stop_after_results=8)  # the end of generation 2
    best = _run(tmp_path / "cut", cfg)
    assert _outcome(tmp_path / "cut") == _outcome(tmp_path / "ref")
    cut, ref = (RunDir.reopen(tmp_path / d).trials() for d in ("cut", "ref"))
    assert {k: t.get("race") for k, t in cut.items()} == {k: t.get("race") for k, t in ref.items()}
    assert all(("race" in t) == racing for t in ref.values())
    assert len(_outcome(tmp_path / "ref")) == 12
    assert best["fitness"] == best_ref["fitness"]
    assert (tmp_path / "cut" / "best" / "recipe.yaml").read_text() == (
        tmp_path / "ref" / "best" / "recipe.yaml"
    ).read_text()


def test_kill_mid_generation_redispatches_only_unfinished(tiny_zoo, tmp_path):
    cfg = search_config(tiny_zoo)
    with pytest.raises(Stop):
        _run(tmp_path / "r", cfg, stop_after_results=6)  # 2 of generation 2's 4 trials done
    before = RunDir.reopen(tmp_path / "r").records()
    done_before = {(r["generation"], r["index"]) for r in before if r.get("status") == "COMPLETE"}
    assert len(done_before) == 6
    _run(tmp_path / "r", cfg)
    records = RunDir.reopen(tmp_path / "r").records()
    completes = [(r["generation"], r["index"]) for r in records if r.get("status") == "COMPLETE"]
    assert len(completes) == len(set(completes)) == 12  # nothing run twice, nothing lost
    assert done_before <= set(completes)


def test_used_run_dir_and_changed_config_are_refused(tiny_zoo, tmp_path):
    cfg = search_config(tiny_zoo)
    RunDir.create(tmp_path / "r", cfg)
    with pytest.raises(EvomergeError, match="in use; resume it"):
        RunDir.create(tmp_path / "r", cfg)
    changed = search_config(tiny_zoo, cma__sigma0=0.5, space={"method": "dare_ties"})
    with pytest.raises(EvomergeError, match=r"config changed .*cma\.sigma0.*space\.method"):
        RunDir.reopen(tmp_path / "r", changed)
    # worker resources may change between sessions
    RunDir.reopen(tmp_path / "r", search_config(tiny_zoo, workers={"count": 3}))


def test_torn_journal_line_is_repaired(tiny_zoo, tmp_path):
    cfg = search_config(tiny_zoo)
    with pytest.raises(Stop):
        _run(tmp_path / "r", cfg, stop_after_results=2)
    with open(tmp_path / "r" / "trials.jsonl", "a") as f:
        f.write('{"generation": 1, "index": 2, "sta')  # a kill in the middle of a write
    _run(tmp_path / "r", cfg)
    assert len([ln for ln in open(tmp_path / "r" / "trials.jsonl")]) == len(
        RunDir.reopen(tmp_path / "r").records()
    )


# -- failures -------------------------------------------------------------------------------


def test_injected_failures_are_recorded_and_the_search_finishes(tiny_zoo, tmp_path):
    cfg = search_config(tiny_zoo, penalty=-5.0)
    best = _run(tmp_path / "r", cfg, faults={"1:0": "raise", "2:3": "nan"})
    trials = RunDir.reopen(tmp_path / "r").trials()
    assert trials[1, 0]["status"] == "FAILED" and "injected fault" in trials[1, 0]["error"]
    assert trials[2, 3]["status"] == "FAILED" and "non-finite" in trials[2, 3]["error"]
    assert trials[1, 0]["fitness"] == -5.0
    assert sum(t["status"] == "COMPLETE" for t in trials.values()) == 10
    assert best is not None and best["status"] == "COMPLETE"
    log = (tmp_path / "r" / "search.log").read_text()
    assert log.count(" started in ") == 1 and " GB/s, " in log  # the worker's start-up


def test_an_undecodable_vector_fails_the_trial_not_the_search(tiny_zoo, tmp_path):
    cfg = search_config(
        tiny_zoo,
        space={
            "method": "ties",
            "normalize": True,
            "ranges": {"weight": {"low": 0.0, "high": 1e-9, "init": 0.0}},
        },
    )
    _run(tmp_path / "r", cfg)  # weights pinned at 0 under normalize: every group sums to zero
    trials = RunDir.reopen(tmp_path / "r").trials()
    zero = [t for t in trials.values() if "sum to zero" in (t.get("error") or "")]
    assert zero and all(t["status"] == "FAILED" for t in zero) and len(trials) == 12


def test_a_bad_recipe_value_fails_the_trial_not_the_search(tiny_zoo, tmp_path):
    cfg = search_config(
        tiny_zoo,
        space={
            "method": "della",
            "fixed": {"epsilon": 0.15},
            "ranges": {"density": {"low": 0.05, "high": 1.0, "init": 0.1}},
        },
    )
    _run(tmp_path / "r", cfg)  # density 0.1 - epsilon 0.15 < 0: DELLA refuses those candidates
    trials = RunDir.reopen(tmp_path / "r").trials()
    failed = [t for t in trials.values() if t["status"] == "FAILED"]
    assert failed and all("epsilon" in t["error"] for t in failed)
    assert len(trials) == 12


# -- the CLI and a real SIGKILL -------------------------------------------------------------


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.search.cli.main", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


@pytest.mark.slow
def test_sigkill_of_the_driver_loses_no_finished_trial(tiny_zoo, tmp_path):
    cfg = search_config(tiny_zoo, cma={"popsize": 4, "budget": 16, "seed": 3, "sigma0": 0.3})
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(cfg.dump()))
    ref = _cli("search", str(config_file), "--run-dir", str(tmp_path / "ref"))
    assert ref.wait(timeout=300) == 0, ref.stdout.read().decode()
    proc = _cli("search", str(config_file), "--run-dir", str(tmp_path / "k"))
    journal = tmp_path / "k" / "trials.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        done = journal.exists() and journal.read_text().count('"COMPLETE"') >= 6
        if done:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {
        (r["generation"], r["index"]): r
        for r in RunDir.reopen(tmp_path / "k").records()
        if r.get("status") == "COMPLETE"
    }
    assert len(finished) >= 6
    res = _cli("resume", str(tmp_path / "k"))
    assert res.wait(timeout=300) == 0, res.stdout.read().decode()
    after = RunDir.reopen(tmp_path / "k").records()
    completes = [(r["generation"], r["index"]) for r in after if r.get("status") == "COMPLETE"]
    assert len(completes) == len(set(completes)) == 16
    assert _outcome(tmp_path / "k") == _outcome(tmp_path / "ref")
    assert (tmp_path / "k" / "best" / "recipe.yaml").read_text() == (
        tmp_path / "ref" / "best" / "recipe.yaml"
    ).read_text()


def test_check_reports_every_problem_at_once(tiny_zoo, tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    data = search_config(tiny_zoo, cma={"popsize": 8, "budget": 4}).dump()
    data["models"]["caps"]["path"] = str(tmp_path / "missing")
    data["fitness"]["tasks"].append({"name": "zoo_cap_gen_search"})
    data["workers"] = {"count": 64, "cpus_per_worker": 2}
    cfg_file.write_text(yaml.safe_dump(data))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "evomerge.search.cli.main",
            "search",
            str(cfg_file),
            "--check",
            "--run-dir",
            str(tmp_path / "used"),
        ],
        capture_output=True,
        text=True,
    )
    out = " ".join(res.stdout.split() + res.stderr.split())
    assert res.returncode == 2, out
    assert "models.caps: model path" in out and "does not exist" in out
    assert "did you mean zoo_caps_gen_search" in out
    assert "exceed this machine's" in out and "run directory is in use" in out
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(search_config(tiny_zoo).dump()))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "evomerge.search.cli.main",
            "search",
            str(good),
            "--check",
            "--run-dir",
            str(tmp_path / "new"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "ok" in res.stdout + res.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_exits_cleanly_and_leaves_a_resumable_run(tiny_zoo, tmp_path, sig, code):
    cfg = search_config(tiny_zoo, cma={"popsize": 4, "budget": 40, "seed": 3, "sigma0": 0.3})
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(cfg.dump()))
    proc = _cli("search", str(config_file), "--run-dir", str(tmp_path / "r"))
    journal = tmp_path / "r" / "trials.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        journal.exists() and journal.read_text().count('"COMPLETE"') >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(sig)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == code, out
    assert "evomerge resume" in out
    before = RunDir.reopen(tmp_path / "r").trials()
    assert 3 <= sum(t["status"] == "COMPLETE" for t in before.values()) < 40
    res = _cli("resume", str(tmp_path / "r"))
    assert res.wait(timeout=300) == 0
    assert (
        sum(t["status"] == "COMPLETE" for t in RunDir.reopen(tmp_path / "r").trials().values())
        == 40
    )


# -- the winner, the parents' line, the random baseline -------------------------------------


def test_the_winner_is_rescored_on_more_items_and_parents_are_scored(tiny_zoo, tmp_path):
    """After the budget the top 2 are scored again on every search item (the search used 8 per
    task) and the best of that second score is the winner; the parents' search-split scores are
    measured once at the start. A finished run resumed adds nothing."""
    from evomerge.fitness.models import load_model
    from evomerge.fitness.scorer import Scorer

    cfg = search_config(
        tiny_zoo, fitness={**search_config(tiny_zoo).fitness.model_dump(), "rescore": {"top": 2}}
    )
    best = _run(tmp_path / "r", cfg)
    run = RunDir.reopen(tmp_path / "r")
    rescored = [t for t in run.trials().values() if "rescored" in t]
    assert len(rescored) == 2 and all(t["rescored"]["examples"] == 80 for t in rescored)
    top2 = sorted(
        (t for t in run.trials().values() if t["status"] == "COMPLETE"),
        key=lambda t: (-t["fitness"], t["generation"], t["index"]),
    )[:2]
    assert {(t["generation"], t["index"]) for t in rescored} == {
        (t["generation"], t["index"]) for t in top2
    }
    winner = max(rescored, key=lambda t: t["rescored"]["fitness"])
    assert (best["generation"], best["index"]) == (winner["generation"], winner["index"])
    assert Recipe.load(tmp_path / "r" / "best" / "recipe.yaml") == Recipe.parse(winner["recipe"])
    parents = run.parents()
    assert set(parents) == {"base", "add", "caps"}
    scorer = Scorer(cfg.fitness.tasks, include_paths=cfg.include_paths(), limit=8, seed=3)
    for alias in ("base", "add"):
        direct = scorer.bind(*load_model(tiny_zoo / "llama" / alias)).score()
        assert parents[alias]["fitness"] == pytest.approx(direct.fitness, abs=1e-12), alias
    lines = len(run.journal_path.read_text().splitlines())
    _run(tmp_path / "r", cfg)
    assert len(run.journal_path.read_text().splitlines()) == lines


def test_random_search_samples_the_box_and_resumes_exactly(tiny_zoo, tmp_path):
    cfg = search_config(tiny_zoo, cma={"sampler": "random", "popsize": 4, "budget": 12, "seed": 3})
    _run(tmp_path / "ref", cfg)
    with pytest.raises(Stop):
        _run(tmp_path / "cut", cfg, stop_after_results=6)
    _run(tmp_path / "cut", cfg)
    assert _outcome(tmp_path / "cut") == _outcome(tmp_path / "ref")
    genome = ParameterSearch(cfg, num_layers=2)
    lo, hi = genome.bounds()
    xs = np.array([t["x"] for t in RunDir.reopen(tmp_path / "ref").trials().values()])
    assert (xs >= lo).all() and (xs <= hi).all() and len({tuple(x) for x in xs}) == 12
