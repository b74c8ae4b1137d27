"""Data-flow search: the genome, a DFS search, and a PS+DFS search whose best recipe rebuilds."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.merge.engine import merge_to_dir
from evomerge.merge.errors import EvomergeError
from evomerge.merge.recipe import Recipe
from evomerge.search.loop.driver import Progress, run_search
from evomerge.search.loop.workers import SerialExecutor
from evomerge.search.run.rundir import RunDir
from evomerge.search.spaces.data_flow_space import DataFlowSearch
from tests.conftest import search_config


def _dfs_config(zoo, **dfs):
    return search_config(
        zoo,
        dfs={"models": ["add", "caps"], "embed_from": "add", "repeats": 2, **dfs},
        cma={"popsize": 4, "budget": 8, "seed": 2, "sigma0": 0.5},
    )


def test_genome_layout_and_initial_point(tiny_zoo):
    cfg = _dfs_config(tiny_zoo, scales="matrix")
    g = DataFlowSearch(cfg, ps_layers=None)
    assert g.dim == 2 * 4 + 4 * 4 and len(g.labels()) == g.dim
    start = g.decode(g.x0()).data_flow
    assert [(h.model, h.layer, h.scale) for h in start.path] == [("add", 0, 1.0), ("add", 1, 1.0)]
    x = g.x0()
    x[4 + 3] = 1.0  # keep caps.1 of the second repetition; the path still ends with add.1
    x[8 + 1 * 4 + 3] = 0.2  # add.1 -> caps.1 scaled by 1.2
    path = [(h.model, h.layer, round(h.scale, 6)) for h in g.decode(x).data_flow.path]
    assert path == [("add", 0, 1.0), ("add", 1, 1.0), ("caps", 1, 1.2), ("add", 1, 1.0)]


def test_path_length_bounds_fail_the_candidate(tiny_zoo):
    g = DataFlowSearch(_dfs_config(tiny_zoo, max_hops=2), ps_layers=None)
    with pytest.raises(EvomergeError, match=r"path has 9 hops, outside \[1, 2\]"):
        g.decode(np.ones(g.dim))


def test_dfs_search_runs_and_its_best_rebuilds(tiny_zoo, tmp_path):
    cfg = _dfs_config(tiny_zoo, max_hops=5)
    run = RunDir.create(tmp_path / "r", cfg)
    best = run_search(run, lambda: SerialExecutor(cfg), Progress())
    trials = run.trials()
    assert len(trials) == 8 and best is not None
    failed = [t for t in trials.values() if t["status"] == "FAILED"]
    assert all("outside [1, 5]" in t["error"] for t in failed)
    recipe = Recipe.load(tmp_path / "r" / "best" / "recipe.yaml")
    merge_to_dir(recipe, tmp_path / "m")
    from evomerge.fitness.models import load_model

    model, _ = load_model(tmp_path / "m")
    assert model.config.num_hidden_layers == len(recipe.data_flow.path)
    from evomerge.search.outputs.report import write_report

    assert (write_report(tmp_path / "r") / "path.png").is_file()


def test_ps_then_dfs_search(tiny_zoo, tmp_path):
    ps_cfg = search_config(tiny_zoo)
    ps_run = RunDir.create(tmp_path / "ps", ps_cfg)
    run_search(ps_run, lambda: SerialExecutor(ps_cfg), Progress())
    cfg = search_config(
        tiny_zoo,
        dfs={
            "models": ["ps", "caps"],
            "embed_from": "ps",
            "ps_recipe": str(tmp_path / "ps"),
            "repeats": 1,
        },
        cma={"popsize": 4, "budget": 8, "seed": 2, "sigma0": 0.5},
    )
    run = RunDir.create(tmp_path / "r", cfg)
    run_search(run, lambda: SerialExecutor(cfg), Progress())
    recipe = Recipe.load(tmp_path / "r" / "best" / "recipe.yaml")
    assert recipe.parameter_space is not None and recipe.data_flow.embed_from == "ps"
    assert (
        recipe.parameter_space
        == Recipe.load(tmp_path / "ps" / "best" / "recipe.yaml").parameter_space
    )
    merge_to_dir(recipe, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_ps_recipe_missing_is_one_clear_error(tiny_zoo, tmp_path):
    cfg = search_config(
        tiny_zoo, dfs={"models": ["ps"], "embed_from": "ps", "ps_recipe": str(tmp_path / "nope")}
    )
    with pytest.raises(EvomergeError, match="dfs.ps_recipe: .*not found; finish the PS search"):
        cfg.ps_recipe()


def test_single_model_data_flow_search_runs_checks_and_exports(tiny_zoo, tmp_path):
    """One model: a path that drops, repeats or rescales its layers. It passes --check, searches,
    and exports as a plain checkpoint without a mergekit config (mergekit cannot scale hops)."""
    from evomerge.search.cli.check import check_search
    from evomerge.search.outputs.export import export

    cfg = search_config(
        tiny_zoo,
        models={"add": {"path": str(tiny_zoo / "llama" / "add")}},
        base="add",
        dfs={"models": ["add"], "embed_from": "add", "repeats": 2, "max_hops": 4},
        cma={"popsize": 4, "budget": 8, "seed": 2, "sigma0": 0.5},
    )
    assert check_search(cfg, tmp_path / "r") == []
    run = RunDir.create(tmp_path / "r", cfg)
    best = run_search(run, lambda: SerialExecutor(cfg), Progress())
    assert best is not None and len(run.trials()) == 8
    out = export(tmp_path / "r", tmp_path / "exp")
    assert (out / "model" / "model.safetensors").is_file() and (out / "heldout.md").is_file()
    assert not (out / "mergekit.yaml").exists()
    card = (out / "model" / "README.md").read_text()
    assert "data-flow path" in card and "mergekit-yaml" not in card
