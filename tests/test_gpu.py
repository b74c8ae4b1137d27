"""GPU paths (run with `pytest -m gpu` on a machine with CUDA; excluded from `make test`)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge.engine import merge_to_dir
from evomerge.merge.recipe import Recipe
from tests.conftest import recipe_dict

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "slerp"])
def test_cuda_merge_matches_cpu(tmp_path, llama_family, method):
    assert torch.cuda.is_available(), "the gpu marker needs a CUDA device"
    data = recipe_dict(llama_family, method)
    if method == "slerp":
        data["parameter_space"]["groups"][0]["params"] = {"expert1": {}}
    recipe = Recipe.parse(data)
    merge_to_dir(recipe, tmp_path / "cpu", device="cpu")
    merge_to_dir(recipe, tmp_path / "gpu", device="cuda")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "gpu"))
    for name in a:  # random masks come from a CPU generator: the same on both devices
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_resident_sources_on_cuda(llama_family):
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.merge.resident import ResidentSources

    recipe = Recipe.parse(recipe_dict(llama_family, "ties"))
    sources = ResidentSources(llama_family, "base", "cuda", task_vectors=True)
    assert sources.models["expert1"].delta("model.layers.0.mlp.up_proj.weight").is_cuda
    config = AutoConfig.from_pretrained(llama_family["base"])
    model = AutoModelForCausalLM.from_config(config).to("cuda")
    sources.materialize(recipe, model)
    cpu = ResidentSources(llama_family, "base", "cpu", task_vectors=True)
    ref = AutoModelForCausalLM.from_config(config)
    cpu.materialize(recipe, ref)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.allclose(p.cpu(), q, atol=1e-6), n
