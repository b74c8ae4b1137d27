"""The tiny zoo, its offline lm-eval tasks, and the Scorer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from evomerge.fitness.scorer import FitnessResult, Scorer, objective
from evomerge.fitness.tasks import TaskSpec, parse_task_list, to_split
from evomerge.fitness.zoo.build import build_zoo, is_built, zoo_key
from evomerge.merge.errors import EvomergeError

GEN = "zoo_add_gen_search"
MC = "zoo_caps_mc_search"


@pytest.fixture(scope="session")
def scorer(tiny_zoo):
    return Scorer(
        [TaskSpec(name=GEN), TaskSpec(name=MC, weight=2.0)],
        include_paths=[tiny_zoo / "tasks"],
        batch_size=32,
    )


def _model(path):
    from evomerge.fitness.models import load_model

    return load_model(path)


def test_zoo_layout_and_disjoint_splits(tiny_zoo):
    for family, names in {
        "llama": ["base", "add", "caps", "next", "joint"],
        "qwen2": ["base", "add", "caps"],
    }.items():
        for n in names:
            assert (tiny_zoo / family / n / "model.safetensors").is_file()
            assert (tiny_zoo / family / n / "tokenizer.json").is_file()
    for skill in ("add", "caps", "next"):
        rows = {
            split: [json.loads(x) for x in open(tiny_zoo / "data" / f"{skill}_{split}.jsonl")]
            for split in ("search", "heldout")
        }
        assert len(rows["search"]) == len(rows["heldout"]) == 40
        assert not {r["prompt"] for r in rows["search"]} & {r["prompt"] for r in rows["heldout"]}
        assert all(r["choices"][r["label"]] == r["answer"] for r in rows["search"])
    assert is_built(tiny_zoo, "tiny", 0)


def test_zoo_is_reused_when_parameters_match(tiny_zoo):
    stamp = (tiny_zoo / "zoo.json").stat().st_mtime_ns
    assert build_zoo(tiny_zoo, size="tiny", log=lambda *_: None) == tiny_zoo
    assert (tiny_zoo / "zoo.json").stat().st_mtime_ns == stamp
    assert zoo_key("tiny", 0) != zoo_key("tiny", 1) != zoo_key("demo", 0)


@pytest.mark.slow
def test_a_second_build_gives_the_same_bytes(tiny_zoo, tmp_path):
    """The zoo is rebuilt by code, never shipped: the same seed must give the same models and
    data, or two machines' demos (and a cache rebuilt after a crash) would disagree."""
    import hashlib

    again = build_zoo(tmp_path / "again", size="tiny", log=lambda *_: None)
    files = sorted(
        p.relative_to(tiny_zoo)
        for p in tiny_zoo.rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".jsonl")
    )
    assert len(files) > 10

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert [digest(again / f) for f in files] == [digest(tiny_zoo / f) for f in files]


def test_tokenizer_round_trip_and_bos_only(tiny_zoo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_zoo / "llama" / "base")
    ids = tok("12+34 =? 46\nab")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "12+34 =? 46\nab"
    ctx, cont = "12+34 =? ", "46"
    assert (
        tok(ctx + cont)["input_ids"][len(tok(ctx)["input_ids"]) :]
        == tok(cont, add_special_tokens=False)["input_ids"]
    )


def test_scorer_matches_simple_evaluate(tiny_zoo, scorer):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = _model(tiny_zoo / "llama" / "add")
    ours = scorer.bind(model, tok).score()
    assert ours.ok, ours.error
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=32, device="cpu")
    ref = lm_eval.simple_evaluate(
        model=lm,
        tasks=[GEN, MC],
        bootstrap_iters=0,
        log_samples=False,
        task_manager=TaskManager(include_path=str(tiny_zoo / "tasks"), include_defaults=False),
    )["results"]
    assert ours.metrics[f"{GEN}/exact_match"] == ref[GEN]["exact_match,none"]
    assert ours.metrics[f"{MC}/acc"] == ref[MC]["acc,none"]
    assert ours.examples == 80
    want = (ref[GEN]["exact_match,none"] + 2 * ref[MC]["acc,none"]) / 3
    assert ours.fitness == pytest.approx(want)


def test_reuse_across_in_place_weight_changes(tiny_zoo, scorer):
    """One bound model whose weights are overwritten in place scores as each source model."""
    resident, tok = _model(tiny_zoo / "llama" / "base")
    scorer.bind(resident, tok)
    for name in ("caps", "base", "next"):
        src, _ = _model(tiny_zoo / "llama" / name)
        with torch.no_grad():
            for p, q in zip(resident.parameters(), src.parameters(), strict=True):
                p.copy_(q)
        in_place = scorer.score()
        fresh = Scorer(scorer.specs, include_paths=[tiny_zoo / "tasks"], batch_size=32)
        direct = fresh.bind(src, tok).score()
        assert in_place.metrics == direct.metrics, name
        assert in_place.metrics == scorer.score().metrics  # deterministic


def test_limit_is_a_seeded_fixed_subset(tiny_zoo):
    a = Scorer([TaskSpec(name=GEN)], include_paths=[tiny_zoo / "tasks"], limit=10, seed=1)
    b = Scorer([TaskSpec(name=GEN)], include_paths=[tiny_zoo / "tasks"], limit=10, seed=1)
    c = Scorer([TaskSpec(name=GEN)], include_paths=[tiny_zoo / "tasks"], limit=0.25, seed=2)
    assert a.samples == b.samples and len(a.samples[GEN]) == 10
    assert len(c.samples[GEN]) == 10 and c.samples != a.samples
    model, tok = _model(tiny_zoo / "llama" / "base")
    assert a.bind(model, tok).score().examples == 10


def test_failures_are_typed(tiny_zoo, scorer, monkeypatch):
    """Whatever fails inside scoring (here: the model call, as an out-of-memory would) comes
    back as a failed result naming the error, never as an exception."""
    model, tok = _model(tiny_zoo / "llama" / "base")
    scorer.bind(model, tok)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(scorer.lm, "generate_until", out_of_memory)
    result = scorer.score()
    assert isinstance(result, FitnessResult) and not result.ok
    assert "out of memory" in result.error and math.isnan(result.fitness)
    monkeypatch.undo()
    assert scorer.bind(model, tok).score().ok  # the scorer is usable again
    broken = Scorer(
        [TaskSpec(name=GEN, metric="no_such_metric")], include_paths=[tiny_zoo / "tasks"]
    )
    bad = broken.bind(model, tok).score()
    assert not bad.ok and "no_such_metric" in bad.error and math.isnan(bad.fitness)


def test_unknown_task_suggests(tiny_zoo):
    with pytest.raises(EvomergeError, match="did you mean zoo_add_gen_search"):
        Scorer([TaskSpec(name="zoo_add_gen_serch")], include_paths=[tiny_zoo / "tasks"])


def test_objective_and_task_specs():
    specs = parse_task_list("a:acc:3,b:exact_match")
    assert specs[0] == TaskSpec(name="a", metric="acc", weight=3.0)
    specs.append(TaskSpec(name="c", metric="loss", direction="minimize"))
    assert objective(specs, {"a/acc": 1.0, "b/exact_match": 0.5, "c/loss": 2.0}) == pytest.approx(
        (3 + 0.5 - 2) / 5
    )
    assert [s.name for s in to_split([TaskSpec(name=GEN)], "heldout")] == ["zoo_add_gen_heldout"]
