"""Data-flow paths: the exported plain checkpoint computes what the in-memory path model does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.merge.dataflow import PathModel
from evomerge.merge.engine import merge_to_dir
from evomerge.merge.errors import EvomergeError
from evomerge.merge.recipe import Recipe
from evomerge.merge.synthetic import make_family

# Norms are scale-invariant only up to their epsilon: random tiny models have hidden states of
# RMS ~0.02, where eps = 1e-6 is visible (max logit error 2e-4; 1.6e-3 for GPT-2's 1e-5). These
# families use eps 1e-12 so the test measures the fold itself.
# Gemma 2/3 fold into their post-sublayer norms' (1 + w) gains; their sliding-window layers
# alternate with global ones, so a path mixes both.
TINY_EPS = {
    "llama": dict(num_hidden_layers=3, rms_norm_eps=1e-12),
    "qwen2": dict(num_hidden_layers=3, rms_norm_eps=1e-12),
    "gemma2": dict(num_hidden_layers=3, rms_norm_eps=1e-12, sliding_window=8),
    "gemma3_text": dict(num_hidden_layers=3, rms_norm_eps=1e-12, sliding_window=8),
    "gpt2": dict(n_layer=3, layer_norm_epsilon=1e-12),
    "gpt_neox": dict(num_hidden_layers=3, layer_norm_eps=1e-12),
}

PATHS = {
    "crossing, repeated layer, scales": [
        ("base", 0, 1.0),
        ("expert1", 1, 0.7),
        ("expert1", 1, 1.3),
        ("expert2", 2, 0.9),
        ("base", 2, 1.2),
    ],
    "single hop of another model": [("expert1", 1, 0.8)],
}


@pytest.fixture(scope="module", params=list(TINY_EPS))
def family(request, tmp_path_factory):
    mt = request.param
    return mt, make_family(
        tmp_path_factory.mktemp(mt), mt, experts=2, delta_scale=0.3, **TINY_EPS[mt]
    )


def _recipe(fam, path, **extra):
    return Recipe.parse(
        {
            "dtype": "float32",
            "models": {a: {"path": str(p)} for a, p in fam.items()},
            "data_flow": {
                "embed_from": "base",
                "path": [{"model": m, "layer": i, "scale": s} for m, i, s in path],
            },
            **extra,
        }
    )


def _path_model(fam, path):
    sources = {a: AutoModelForCausalLM.from_pretrained(p).eval() for a, p in fam.items()}
    return PathModel(sources["base"], sources).set_path(path).eval()


@pytest.mark.parametrize("case", list(PATHS))
def test_export_matches_the_in_memory_path_model(family, tmp_path, case):
    mt, fam = family
    path = PATHS[case]
    merge_to_dir(_recipe(fam, path), tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert exported.config.num_hidden_layers == len(path)
    in_memory = _path_model(fam, path)
    ids = torch.randint(0, 128, (4, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (exported(ids).logits - in_memory(ids).logits).abs().max().item()
    assert diff <= 1e-4, (mt, case, diff)


def test_generation_with_kv_cache_equals_without(family):
    _, fam = family
    model = _path_model(fam, PATHS["crossing, repeated layer, scales"])
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = model.generate(
            ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0
        )
        uncached = model.generate(
            ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0
        )
    assert torch.equal(cached, uncached)


def test_path_model_shares_weights_and_leaves_sources_intact(tmp_path):
    fam = make_family(tmp_path, "llama", experts=1, num_hidden_layers=3)
    sources = {a: AutoModelForCausalLM.from_pretrained(p).eval() for a, p in fam.items()}
    before = {n: p.clone() for n, p in sources["base"].named_parameters()}
    model = PathModel(sources["base"], sources).set_path([("base", 0, 1.0), ("expert1", 2, 0.5)])
    hop = model.model.layers[1].layer
    assert hop is sources["expert1"].model.layers[2]  # the same module: no copy
    assert len(sources["base"].model.layers) == 3 and sources["base"].config.num_hidden_layers == 3
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        model(ids)
        sources["base"](ids)  # the source still runs as itself
    assert all(torch.equal(before[n], p) for n, p in sources["base"].named_parameters())


def test_ps_then_dfs_recipe_rebuilds(tmp_path):
    fam = make_family(tmp_path / "f", "llama", experts=2, delta_scale=0.3, **TINY_EPS["llama"])
    ps = {
        "method": "task_arithmetic",
        "base": "base",
        "groups": [
            {"layers": [0, 3], "params": {"expert1": {"weight": 0.5}, "expert2": {"weight": 0.5}}}
        ],
    }
    recipe = _recipe(fam, [("ps", 0, 1.0), ("expert2", 1, 0.9), ("ps", 2, 1.1)], parameter_space=ps)
    recipe = recipe.model_copy(
        update={"data_flow": recipe.data_flow.model_copy(update={"embed_from": "ps"})}
    )
    merge_to_dir(recipe, tmp_path / "out")
    merge_to_dir(recipe.ps_only(), tmp_path / "ps")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    sources = {a: AutoModelForCausalLM.from_pretrained(p).eval() for a, p in fam.items()}
    sources["ps"] = AutoModelForCausalLM.from_pretrained(tmp_path / "ps").eval()
    in_memory = (
        PathModel(sources["ps"], sources)
        .set_path([(h.model, h.layer, h.scale) for h in recipe.data_flow.path])
        .eval()
    )
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert (exported(ids).logits - in_memory(ids).logits).abs().max() <= 1e-4
    assert not (tmp_path / "out" / ".stage1").exists()
    assert Recipe.load(tmp_path / "out" / "evomerge_recipe.yaml") == recipe


def test_gemma_post_norm_fold_is_not_a_plain_division(tmp_path):
    """The (1 + w) gain is what scales: dividing w alone would be wrong."""
    fam = make_family(tmp_path / "f", "gemma2", experts=1, delta_scale=0.3, num_hidden_layers=2)
    merge_to_dir(_recipe(fam, [("base", 0, 1.0), ("expert1", 1, 0.5)]), tmp_path / "out")
    from safetensors.torch import load_file

    src = load_file(fam["expert1"] / "model.safetensors")
    out = load_file(tmp_path / "out" / "model.safetensors")
    for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
        w = src[f"model.layers.1.{norm}.weight"]
        assert torch.allclose(1 + out[f"model.layers.1.{norm}.weight"], (1 + w) / 0.5)
    assert torch.equal(
        out["model.layers.1.input_layernorm.weight"], src["model.layers.1.input_layernorm.weight"]
    )


def test_unfoldable_architecture_is_refused(tmp_path):
    fam = make_family(tmp_path, "olmo2", experts=0)
    with pytest.raises(EvomergeError, match="olmo2.*cannot be folded exactly"):
        merge_to_dir(_recipe(fam, [("base", 0, 1.0)]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_paths_are_refused(tmp_path):
    fam = make_family(tmp_path, "llama", experts=1)
    with pytest.raises(EvomergeError, match="path.0.scale: must be positive"):
        _recipe(fam, [("base", 0, -1.0)])
    with pytest.raises(EvomergeError, match=r"data_flow.path.0.model: 'ps' is not in models"):
        _recipe(fam, [("ps", 0, 1.0)])
    with pytest.raises(EvomergeError, match="has 2 layers, no layer 5"):
        merge_to_dir(_recipe(fam, [("base", 5, 1.0)]), tmp_path / "out")
