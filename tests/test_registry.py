"""Adding a merge method is one registration: the README's worked example, run as written, gives
recipes, a search genome and a mergekit export for the new method."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge.engine import merge_to_dir
from evomerge.merge.errors import EvomergeError
from evomerge.merge.io.checkpoint import Checkpoint
from evomerge.merge.ops.registry import METHODS, get_method
from evomerge.merge.recipe import Recipe
from evomerge.search.spaces.mergekit_yaml import to_mergekit
from evomerge.search.spaces.parameter_space import ParameterSearch
from tests.conftest import search_config
from tests.test_export import _mergekit

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def nearswap():
    """The README's "Adding a merge method" code block, executed as it stands."""
    section = README.read_text().split("## Adding a merge method", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    try:
        yield get_method("nearswap")
    finally:
        METHODS.pop("nearswap", None)


def _recipe(paths, t_first=2e-3, t_rest=5e-4) -> Recipe:
    return Recipe.parse(
        {
            "dtype": "float32",
            "models": {a: {"path": str(paths[a])} for a in ("base", "expert1")},
            "parameter_space": {
                "method": "nearswap",
                "base": "base",
                "t": t_rest,
                "groups": [
                    {"layers": [0, 1], "params": {"expert1": {}}, "t": t_first},
                    {"layers": [1, 2], "params": {"expert1": {}}},
                ],
            },
        }
    )


def test_readme_method_merges_as_mergekit_does(nearswap, llama_family, tmp_path):
    recipe = _recipe(llama_family)
    merge_to_dir(recipe, tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    ck = Checkpoint(llama_family["base"])
    config = to_mergekit(recipe, ck.names, ck.info.num_layers)
    assert config["merge_method"] == "nearswap" and config["parameters"]["t"] == 5e-4
    theirs = _mergekit(config, tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    base, other = (
        load_file(llama_family["base"] / "model.safetensors"),
        load_file(llama_family["expert1"] / "model.safetensors"),
    )
    changed = [n for n in ours if not torch.equal(ours[n], base[n])]
    assert changed and any(not torch.equal(ours[n], other[n]) for n in changed)


def test_readme_method_has_recipe_checks_and_search_genes(nearswap, llama_family, tiny_zoo):
    with pytest.raises(EvomergeError, match=r"groups\.0\.t: must be in \[0, 1\], got 2"):
        _recipe(llama_family, t_first=2.0)
    with pytest.raises(EvomergeError, match="weight: unknown field"):
        Recipe.parse(
            {
                "models": {"b": {"path": "/x"}, "e": {"path": "/y"}},
                "parameter_space": {
                    "method": "nearswap",
                    "base": "b",
                    "groups": [{"layers": [0, 2], "params": {"e": {"weight": 1.0}}}],
                },
            }
        )
    cfg = search_config(
        tiny_zoo,
        models={a: {"path": str(tiny_zoo / "llama" / a)} for a in ("base", "add")},
        space={"method": "nearswap"},
    )
    genome = ParameterSearch(cfg, num_layers=2)
    assert genome.labels() == ["embed/t", "layers[0,1)/t", "layers[1,2)/t", "head/t"]
    recipe = genome.decode(genome.x0())
    assert recipe.parameter_space.group_values(recipe.parameter_space.groups[1]) == {"t": 1e-4}
