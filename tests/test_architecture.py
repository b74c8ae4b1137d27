"""Every tensor of every supported family maps to a layer or to the embed / head / norm groups."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from evomerge.merge.architecture import ModelInfo, Slot, classify
from evomerge.merge.errors import EvomergeError
from evomerge.merge.synthetic import make_family, tiny_config

FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_tensor_classified(model_type):
    config = tiny_config(model_type)
    names = list(AutoModelForCausalLM.from_config(config).state_dict())
    slots = {n: classify(n) for n in names}
    layers = {s.layer for s in slots.values() if s.group == "layer"}
    assert layers == set(range(config.num_hidden_layers))
    groups = {s.group for s in slots.values()}
    # a tied model's state dict still names its head (`lm_head.weight`), so every group is there
    assert groups == {"embed", "layer", "final_norm", "head"}
    kinds = {s.kind for s in slots.values() if s.group == "layer"}
    assert kinds == {"attention", "mlp", "other"}


def test_known_names():
    assert classify("model.layers.3.self_attn.q_proj.weight") == Slot("layer", 3, "attention")
    assert classify("transformer.h.1.mlp.c_fc.bias") == Slot("layer", 1, "mlp")
    assert classify("gpt_neox.layers.0.input_layernorm.weight") == Slot("layer", 0, "other")
    assert classify("model.embed_tokens.weight") == Slot("embed")
    assert classify("transformer.wpe.weight") == Slot("embed")
    assert classify("lm_head.weight") == Slot("head")
    assert classify("embed_out.weight") == Slot("head")
    assert classify("model.norm.weight") == Slot("final_norm")
    assert classify("transformer.ln_f.bias") == Slot("final_norm")


def test_unlisted_architecture_uses_the_general_rule():
    assert classify("backbone.blocks.12.mixer.in_proj.weight") == Slot("layer", 12, "other")
    with pytest.raises(EvomergeError, match="cannot tell"):
        classify("something.odd")


def test_tied_checkpoint_has_no_head_tensor(tmp_path):
    paths = make_family(tmp_path, "llama", experts=0, tie_word_embeddings=True)
    info = ModelInfo.from_dir(paths["base"])
    assert info.tie_word_embeddings and info.num_layers == 2
    from evomerge.merge.io.checkpoint import Checkpoint

    assert "lm_head.weight" not in Checkpoint(paths["base"]).names
