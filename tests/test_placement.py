"""A worker's model split over several devices: which device each tensor and module goes to."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from evomerge.merge.architecture import classify
from evomerge.merge.placement import Placement, layer_runs
from evomerge.merge.synthetic import tiny_config


@pytest.mark.parametrize("layers,devices", [(32, 8), (80, 8), (10, 3), (2, 4), (1, 1)])
def test_layer_runs_cover_every_layer_once_in_order(layers, devices):
    runs = layer_runs(layers, devices)
    assert len(runs) == devices
    assert [i for r in runs for i in r] == list(range(layers))
    sizes = [len(r) for r in runs]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("qwen2", True), ("gpt2", False)])
def test_every_parameter_and_buffer_is_placed_as_its_tensor_is(model_type, tied):
    """The module-level device map accelerate dispatches by agrees with the tensor-level
    placement the sources use: each GPU merges exactly the tensors its modules hold."""
    layers = {"n_layer": 4} if model_type == "gpt2" else {"num_hidden_layers": 4}
    config = tiny_config(model_type, tie_word_embeddings=tied, **layers)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    devices = ("cuda:0", "cuda:1", "cuda:2")
    placement = Placement(devices, 4, tied=tied)
    device_map = placement.device_map(model)
    for name, _ in model.named_parameters():
        module = name.rpartition(".")[0]
        assert device_map[module] == placement.device_of(name), name
    for name, _ in model.named_buffers():
        assert name.rpartition(".")[0] in device_map, name
    layer_devices = [placement.device_of(n) for n, _ in model.named_parameters()]
    assert set(layer_devices) == set(devices)
    slots = {n: classify(n) for n, _ in model.named_parameters()}
    first_layer = next(n for n, s in slots.items() if s.group == "layer" and s.layer == 0)
    last_layer = next(n for n, s in slots.items() if s.group == "layer" and s.layer == 3)
    assert placement.device_of(first_layer) == "cuda:0"
    assert placement.device_of(last_layer) == "cuda:2"
    embed = next(n for n, s in slots.items() if s.group == "embed")
    assert placement.device_of(embed) == "cuda:0"
    head = "lm_head.weight"
    assert placement.device_of(head) == ("cuda:0" if tied else "cuda:2")


def test_one_device_places_everything_there():
    p = Placement(("cpu",), 4)
    assert p.device_of("model.layers.3.mlp.up_proj.weight") == "cpu"
    assert p.device_of("lm_head.weight") == "cpu"
    with pytest.raises(ValueError):
        Placement((), 4)


def test_empty_model_is_placed_uninitialized_in_the_recipe_dtype(llama_family):
    """Built on the meta device and given memory on its device: no random draws, the dtype
    asked for, buffers computed (rotary frequencies are not garbage)."""
    from transformers import AutoConfig

    from evomerge.fitness.models import empty_model

    model = empty_model(llama_family["base"], "bfloat16", Placement(("cpu",), 2))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in model.parameters())
    ref = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(llama_family["base"], trust_remote_code=False)
    )
    for (name, b), (_, want) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(b.float(), want.float()), name
