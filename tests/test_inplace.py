"""Merges written in place (a search's candidate, `eval --recipe`) are the checkpoint
`evomerge merge` writes, bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.merge.engine import merge_to_dir
from evomerge.merge.recipe import Recipe
from evomerge.merge.resident import ResidentSources
from evomerge.merge.synthetic import make_family
from tests.conftest import recipe_dict


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory):
    """Qwen2 with tied embeddings: the checkpoint has no lm_head.weight."""
    return make_family(
        tmp_path_factory.mktemp("tied"), "qwen2", experts=2, tie_word_embeddings=True
    )


def _recipe(paths, method):
    data = recipe_dict(paths, method)
    if method == "slerp":
        data["parameter_space"]["groups"][0]["params"] = {"expert1": {}}
    return Recipe.parse(data)


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties", "linear", "slerp"])
@pytest.mark.parametrize("family", ["llama_family", "tied_family"])
def test_materialized_candidate_is_the_merged_checkpoint(tmp_path, request, method, family):
    paths = request.getfixturevalue(family)
    recipe = _recipe(paths, method)
    merge_to_dir(recipe, tmp_path / "m")
    want = load_file(tmp_path / "m" / "model.safetensors")
    sources = ResidentSources(paths, "base", "cpu", task_vectors=method != "linear", threads=2)
    config = AutoConfig.from_pretrained(paths["base"], trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config)
    other = _recipe(paths, "ties" if method != "ties" else "task_arithmetic")
    for r in (other, recipe):  # a candidate before: reused scratch and parameters leak nothing
        sources.materialize(r, model)
    got = dict(model.named_parameters())
    for name, t in want.items():
        assert torch.equal(got[name].detach(), t), name


@pytest.mark.parametrize("family", ["llama_family", "tied_family"])
def test_model_from_recipe_is_the_merged_checkpoint(tmp_path, request, family, monkeypatch):
    from evomerge.fitness import models

    paths = request.getfixturevalue(family)
    monkeypatch.setattr(models, "load_tokenizer", lambda path: None)  # the families have none
    recipe = _recipe(paths, "ties")
    merge_to_dir(recipe, tmp_path / "m")
    built, _ = models.model_from_recipe(recipe)
    loaded, _ = models.load_model(tmp_path / "m")
    a, b = built.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = torch.arange(10).reshape(1, 10)
    assert torch.equal(built(ids).logits, loaded(ids).logits)


def test_model_from_recipe_refuses_a_checkpoint_without_a_parameter(tmp_path, llama_family):
    """The model is built uninitialized: a parameter no checkpoint holds is refused by name, not
    left as whatever memory it got."""
    import shutil

    from safetensors.torch import save_file

    from evomerge.fitness import models
    from evomerge.merge.errors import EvomergeError

    paths = {}
    for alias, path in llama_family.items():
        paths[alias] = tmp_path / alias
        shutil.copytree(path, paths[alias])
        for f in paths[alias].glob("*.safetensors"):
            tensors = {k: v for k, v in load_file(f).items() if k != "model.norm.weight"}
            save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(EvomergeError, match="does not fit .*model.norm.weight"):
        models.model_from_recipe(_recipe(paths, "ties"))
