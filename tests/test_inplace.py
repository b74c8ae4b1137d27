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
    sources = ResidentSources(paths, "base", "cpu", threads=2)
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


@pytest.fixture(scope="module")
def bf16_families(tmp_path_factory):
    """What users have: bf16 checkpoints (many exact ties in magnitude), sharded, one family
    with tied embeddings."""
    root = tmp_path_factory.mktemp("bf16")
    return {
        "llama": make_family(root / "llama", "llama", dtype=torch.bfloat16, shards=3),
        "qwen2_tied": make_family(
            root / "qwen2", "qwen2", dtype=torch.bfloat16, shards=2, tie_word_embeddings=True
        ),
    }


@pytest.mark.parametrize("family", ["llama", "qwen2_tied"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "linear"])
@pytest.mark.parametrize("where", ["device", "host"])
def test_bf16_resident_candidate_is_evomerge_merge_bit_for_bit(
    tmp_path, bf16_families, monkeypatch, family, method, where
):
    """A search's candidate over bf16 sources kept bf16 (dtype auto: a bf16 candidate) holds
    exactly the tensors `evomerge merge` writes for its recipe, with the sources on the device
    or in host memory (streamed through the read-ahead path)."""
    from evomerge.fitness import models
    from evomerge.search.spaces import space_for
    from tests.conftest import search_config

    paths = bf16_families[family]
    monkeypatch.setattr(models, "load_tokenizer", lambda path: None)  # the families have none
    config = search_config(
        tmp_path,
        models={a: {"path": str(p)} for a, p in paths.items()},
        space={"method": method, "layers_per_group": 1},
        workers={"count": 0, "sources": where},
    )
    assert config.merge_dtype == "bfloat16"
    space = space_for(config)
    candidate = space.candidate("cpu")
    assert candidate.sources.where == where
    assert {t.dtype for m in candidate.sources.models.values() for t in m.tensors.values()} == {
        torch.bfloat16
    }
    assert {p.dtype for p in candidate.model.parameters()} == {torch.bfloat16}
    import numpy as np

    x = space.x0() + np.random.default_rng(0).normal(0, 0.3, space.dim)
    recipe = space.decode(x, seed=11)
    candidate.materialize(space.decode(space.x0(), seed=1))  # another candidate first
    candidate.materialize(recipe)
    merge_to_dir(recipe, tmp_path / "m")
    want = {}
    for f in (tmp_path / "m").glob("*.safetensors"):
        want.update(load_file(f))
    got = dict(candidate.model.named_parameters())
    assert want
    for name, t in want.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(got[name].detach().view(torch.int16), t.view(torch.int16)), name
