"""Models named by hub ID (`org/name`, `org/name@revision`), resolved from a hub-layout cache with
HF_HUB_OFFLINE=1 (no network here), pinned to their commits in run.yaml, the journal, the merge's
recipe and the export; built-in-style tasks held out by a seeded split; a user's search keeps the
user's environment."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evomerge.merge.io import hub
from evomerge.merge.recipe import Recipe
from evomerge.search.cli.main import app
from evomerge.search.config import SearchConfig
from evomerge.search.loop.driver import Progress, run_search
from evomerge.search.loop.workers import SerialExecutor
from evomerge.search.run.rundir import RunDir
from tests.conftest import search_config

runner = CliRunner()
SHA = {"base": "1" * 40, "add": "2" * 40, "caps": "3" * 40, "add-old": "4" * 40}


@pytest.fixture
def hub_cache(tiny_zoo, tmp_path):
    """models--zoo--{base,add,caps}/{refs/main, snapshots/<sha>/...}: the layout huggingface_hub
    writes, populated from the tiny zoo; zoo/add also has an older revision (add-old = caps)."""
    cache = tmp_path / "hub"
    for name, source in [("base", "base"), ("add", "add"), ("caps", "caps"), ("add-old", "caps")]:
        repo = cache / f"models--zoo--{name.split('-')[0]}"
        shutil.copytree(tiny_zoo / "llama" / source, repo / "snapshots" / SHA[name])
        if not name.endswith("old"):
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / "main").write_text(SHA[name])
    hub._cache.clear()
    yield cache
    hub._cache.clear()
    hub.use_cache(None)


def _hub_config(tiny_zoo, cache, **over):
    cfg = search_config(tiny_zoo).dump()
    cfg["models"] = {
        "base": {"path": "zoo/base"},
        "add": {"path": f"zoo/add@{SHA['add']}"},
        "caps": {"path": "zoo/caps@main"},
    }
    cfg["cache_dir"] = str(cache)
    cfg.update(over)
    return SearchConfig.parse(cfg)


def test_references_resolve_from_the_cache_and_pin(hub_cache):
    hub.use_cache(str(hub_cache))
    assert hub.is_hub_ref("zoo/base") and not hub.is_hub_ref(str(hub_cache))
    r = hub.resolve("zoo/base")
    assert r.pinned == f"zoo/base@{SHA['base']}" and (r.local / "config.json").is_file()
    old = hub.resolve(f"zoo/add@{SHA['add-old']}")  # an older revision, by commit
    assert old.local.name == SHA["add-old"] and old.pinned.endswith(SHA["add-old"])
    with pytest.raises(Exception, match=r"zoo/add@5{40} is not in .* the hub cannot be reached"):
        hub.resolve("zoo/add@" + "5" * 40, label="models.add")


def test_merge_resolves_hub_ids_and_writes_pinned_revisions(hub_cache, tmp_path):
    recipe = {
        "dtype": "float32",
        "models": {"base": {"path": "zoo/base"}, "add": {"path": f"zoo/add@{SHA['add']}"}},
        "parameter_space": {
            "method": "task_arithmetic",
            "base": "base",
            "groups": [{"layers": [0, 2], "params": {"add": {"weight": 0.5}}}],
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {"HF_HUB_CACHE": str(hub_cache)}
    hub.use_cache(str(hub_cache))
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / "out")], env=env)
    assert result.exit_code == 0, result.output
    written = Recipe.load(tmp_path / "out" / "evomerge_recipe.yaml")
    assert written.models["base"].path == f"zoo/base@{SHA['base']}"
    assert written.models["add"].path == f"zoo/add@{SHA['add']}"


def test_search_pins_revisions_in_run_yaml_journal_and_export(hub_cache, tiny_zoo, tmp_path):
    cfg = _hub_config(tiny_zoo, hub_cache)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(cfg.dump()))
    check = runner.invoke(
        app, ["search", str(config_file), "--check", "--run-dir", str(tmp_path / "r")]
    )
    assert check.exit_code == 0, check.output
    run = RunDir.create(tmp_path / "r", cfg)
    meta = yaml.safe_load((tmp_path / "r" / "run.yaml").read_text())
    pinned = {
        "base": f"zoo/base@{SHA['base']}",
        "add": f"zoo/add@{SHA['add']}",
        "caps": f"zoo/caps@{SHA['caps']}",
    }
    assert meta["pinned"] == pinned and meta["config"]["models"]["caps"]["path"] == "zoo/caps@main"
    run_search(run, lambda: SerialExecutor(run.config), Progress())
    trials = RunDir.reopen(tmp_path / "r").trials().values()
    assert all(
        {a: m["path"] for a, m in t["recipe"]["models"].items()} == pinned
        for t in trials
        if "recipe" in t
    )
    from evomerge.search.outputs.export import export

    out = export(tmp_path / "r", tmp_path / "exp")
    assert Recipe.load(out / "recipe.yaml").models["add"].path == pinned["add"]
    mergekit = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert mergekit["base_model"] == pinned["base"]
    assert {s["model"] for sl in mergekit["slices"] for s in sl["sources"]} == set(pinned.values())
    assert pinned["caps"] in (out / "model" / "README.md").read_text()


def test_resume_keeps_the_pinned_revision_and_refuses_when_it_is_gone(
    hub_cache, tiny_zoo, tmp_path
):
    cfg = _hub_config(tiny_zoo, hub_cache, cma={"popsize": 4, "budget": 4, "seed": 3})
    RunDir.create(tmp_path / "r", cfg)
    # main moves on after the run started: the run keeps the revision it started with
    (hub_cache / "models--zoo--caps" / "refs" / "main").write_text(SHA["add-old"])
    shutil.copytree(
        hub_cache / "models--zoo--caps" / "snapshots" / SHA["caps"],
        hub_cache / "models--zoo--caps" / "snapshots" / SHA["add-old"],
    )
    hub._cache.clear()
    assert RunDir.reopen(tmp_path / "r").config.model_refs()["caps"] == f"zoo/caps@{SHA['caps']}"
    shutil.rmtree(hub_cache / "models--zoo--caps" / "snapshots" / SHA["caps"])
    hub._cache.clear()
    result = runner.invoke(app, ["resume", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"zoo/caps@{SHA['caps']} is not in" in result.output


def test_a_users_search_does_not_force_offline_on_its_workers(tiny_zoo, monkeypatch):
    from evomerge.search import env

    for var in env.OFFLINE_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_user_token")
    passed = env.passed_on()
    assert not set(env.OFFLINE_ENV) & set(passed) and passed["HF_TOKEN"] == "hf_user_token"
    SerialExecutor(search_config(tiny_zoo))  # a worker, built in this process
    assert not set(env.OFFLINE_ENV) & set(os.environ)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # --offline: passed on as the user asked
    assert env.passed_on()["HF_HUB_OFFLINE"] == "1"


def test_a_held_out_share_never_meets_the_search(tiny_zoo):
    """A task without a held-out twin (as lm-eval's built-in tasks) declares `holdout`: the
    search scores only its search part, the held-out table only the other part."""
    from evomerge.fitness.models import load_model
    from evomerge.fitness.scorer import Scorer

    cfg = search_config(
        tiny_zoo,
        fitness={
            "tasks": [{"name": "zoo_add_gen_search", "holdout": 0.25}],
            "include": [str(tiny_zoo / "tasks")],
            "batch_size": 16,
        },
    )
    (spec,) = cfg.heldout_specs()
    assert spec.name == "zoo_add_gen_search"  # the same task, its other part
    search = Scorer(cfg.fitness.tasks, include_paths=cfg.include_paths(), limit=8, part="search")
    held = Scorer(cfg.heldout_specs(), include_paths=cfg.include_paths(), part="heldout")
    s_docs, h_docs = set(search.docs[spec.name]), set(held.docs[spec.name])
    assert len(h_docs) == 10 and len(s_docs) == 30 and not s_docs & h_docs
    model, tok = load_model(tiny_zoo / "llama" / "add")
    search.bind(model, tok)
    built = set(search.requests["search"][0].by_doc)
    assert built <= s_docs and len(built) == 8
    rescore = set(search.items("rescore")[spec.name])
    assert rescore == s_docs  # rescoring reaches every search item, never a held-out one
    assert held.bind(model, tok).score().examples == 10


def test_the_readme_real_models_config_is_valid():
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Real models and real tasks", 1)[1]
    cfg = SearchConfig.parse(
        yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    )
    assert hub.is_hub_ref(cfg.models["math"].path) and cfg.fitness.tasks[0].holdout == 0.5
    assert hub.split_ref(cfg.models["code"].path) == ("your-org/code-7b", "v1.2")
