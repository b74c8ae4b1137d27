"""Export: mergekit.yaml describes the same merge (mergekit itself rebuilds it), and the exported
model loads with transformers and scores as the export reports."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.merge.engine import merge_to_dir
from evomerge.merge.io.checkpoint import Checkpoint
from evomerge.merge.recipe import Recipe
from evomerge.merge.synthetic import make_family
from evomerge.search.loop.driver import Progress, run_search
from evomerge.search.loop.workers import SerialExecutor
from evomerge.search.outputs.export import export
from evomerge.search.run.rundir import RunDir
from evomerge.search.spaces.mergekit_yaml import to_mergekit
from tests.conftest import search_config


def _mergekit(config: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    mc = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config)))
    run_merge(mc, str(out), MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    return merged


@pytest.fixture(scope="module")
def family3(tmp_path_factory):
    return make_family(
        tmp_path_factory.mktemp("fam3"),
        "llama",
        experts=2,
        num_hidden_layers=3,
        tie_word_embeddings=False,
    )


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear", "breadcrumbs_ties"])
def test_mergekit_yaml_rebuilds_the_same_merge(tmp_path, family3, method):
    def p(w, d):
        return (
            {"weight": w, "density": d}
            if method not in ("linear", "task_arithmetic")
            else {"weight": w}
        )

    groups = [
        {"layers": "embed", "params": {"expert1": p(0.3, 0.5), "expert2": p(0.9, 0.7)}},
        {
            "layers": [0, 2],
            "tensors": "attention",
            "params": {"expert1": p(0.6, 0.4), "expert2": p(0.2, 0.9)},
        },
        {
            "layers": [0, 2],
            "tensors": "mlp",
            "params": {"expert1": p(0.5, 0.5), "expert2": p(0.5, 0.6)},
        },
        {"layers": [0, 2], "tensors": "other", "params": {"expert1": p(0.1, 0.8)}},
        {"layers": [2, 3], "params": {"expert1": p(0.7, 0.3), "expert2": p(0.4, 0.8)}},
        {"layers": "head", "params": {"expert1": p(0.2, 0.6), "expert2": p(1.1, 0.5)}},
    ]
    if method == "linear":
        for g in groups:
            g["params"]["base"] = {"weight": 0.5}
    recipe = Recipe.parse(
        {
            "dtype": "float32",
            "models": {a: {"path": str(x)} for a, x in family3.items()},
            "parameter_space": {"method": method, "base": "base", "groups": groups},
        }
    )
    merge_to_dir(recipe, tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    ck = Checkpoint(family3["base"])
    theirs = _mergekit(to_mergekit(recipe, ck.names, 3), tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-6, rtol=0), name


@pytest.mark.slow
def test_export_of_a_search(tiny_zoo, tmp_path):
    from evomerge.fitness.models import load_model
    from evomerge.fitness.scorer import Scorer
    from evomerge.fitness.tasks import TaskSpec

    cfg = search_config(tiny_zoo, cma={"popsize": 4, "budget": 8, "seed": 1, "sigma0": 0.3})
    run = RunDir.create(tmp_path / "run", cfg)
    run_search(run, lambda: SerialExecutor(cfg), Progress())
    out = export(tmp_path / "run", tmp_path / "exp", top_k=2)
    for f in (
        "recipe.yaml",
        "mergekit.yaml",
        "heldout.csv",
        "heldout.md",
        "model/README.md",
        "model/model.safetensors",
        "model/tokenizer.json",
    ):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader(open(out / "heldout.csv")))
    kinds = [r["kind"] for r in rows]
    assert (
        kinds.count("searched") == 2 and kinds.count("parent") == 3 and kinds.count("untuned") == 7
    )
    # transformers loads the exported model, and it scores as the table says
    model, tok = load_model(out / "model")
    heldout = [TaskSpec(name="zoo_add_gen_heldout"), TaskSpec(name="zoo_caps_mc_heldout")]
    result = (
        Scorer(heldout, include_paths=[tiny_zoo / "tasks"], batch_size=16).bind(model, tok).score()
    )
    assert result.ok
    assert float(rows[0]["heldout objective"]) == pytest.approx(result.fitness, abs=1e-9)
    assert Recipe.load(out / "recipe.yaml") == Recipe.load(
        tmp_path / "run" / "best" / "recipe.yaml"
    )
    with pytest.raises(Exception, match="exists"):
        export(tmp_path / "run", tmp_path / "exp")


def test_report_of_a_run_in_progress(tiny_zoo, tmp_path):
    from evomerge.search.outputs.report import summarize, trials_frame, write_report

    cfg = search_config(tiny_zoo, cma={"popsize": 4, "budget": 12, "seed": 1, "sigma0": 0.3})
    run = RunDir.create(tmp_path / "run", cfg)

    class Stop(Exception):
        pass

    def stop_at_6(done, record, best):
        if done == 6:
            raise Stop

    with pytest.raises(Stop):
        run_search(
            run, lambda: SerialExecutor(cfg, {"1:2": "raise"}), Progress(on_result=stop_at_6)
        )
    out = write_report(tmp_path / "run")
    assert {"index.html", "fitness.png", "genome.png"} <= {p.name for p in out.iterdir()}
    tables = summarize(run, trials_frame(run))
    status = tables["trials by status"]["trials"].to_dict()
    assert status == {"ASKED": 2, "COMPLETE": 5, "FAILED": 1}  # generation 2 is half done
    assert list(tables["fitness per generation"]["count"]) == [3, 2]
    assert "injected fault" in (out / "index.html").read_text()


def test_demo_summary_line_names_the_best_of_each_kind():
    from evomerge.search.cli.demo import heldout_summary

    rows = [
        {"model": "evomerge best", "kind": "searched", "mean": 0.55},
        {"model": "add", "kind": "parent", "mean": 0.32},
        {"model": "caps", "kind": "parent", "mean": 0.33},
        {"model": "ties", "kind": "untuned", "mean": 0.06},
        {"model": "task arithmetic (lambda 0.7)", "kind": "untuned", "mean": 0.46},
        {"model": "joint reference", "kind": "reference", "mean": 0.63},
    ]
    assert heldout_summary(rows) == (
        "held-out mean: best 0.550, best parent 0.330 (caps), best untuned 0.460 "
        "(task arithmetic (lambda 0.7)), joint 0.630"
    )
