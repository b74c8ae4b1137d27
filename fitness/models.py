"""Load a model (and tokenizer) for scoring: from a directory, or built from a recipe in memory."""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.merge.errors import EvomergeError


def load_tokenizer(path: Path | str):
    """A model directory's tokenizer; a tokenizer that needs the folder's own code is refused."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise EvomergeError(f"{path}: no usable tokenizer ({first})") from None


def check_loadable(path: Path | str, label: str = "--model") -> None:
    """Refuse, in one line, a model directory transformers could not load without running its
    code or unpickling: its weights and config are checked (merge.checkpoint) and its
    model_type must be one transformers ships."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from evomerge.merge.io.checkpoint import Checkpoint

    info = Checkpoint(path, label=label).info
    if info.model_type not in CONFIG_MAPPING:
        import transformers

        raise EvomergeError(
            f"{label}: {Path(path) / 'config.json'} has model_type {info.model_type!r}, which "
            f"transformers {transformers.__version__} does not know; use a supported architecture"
        )


def load_model(
    path: Path | str, device: str = "cpu", dtype: str = "float32", label: str = "--model"
):
    """(model, tokenizer) from a local HF directory; safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM

    check_loadable(path, label)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False
    )
    return model.to(device).eval(), load_tokenizer(path)  # type: ignore[arg-type]


def empty_model(path: Path | str, dtype: str, placement):
    """The model of a checkpoint directory, its parameters uninitialized memory in `dtype` on
    the devices `placement` gives them (random init cost ~1.6 s per 100M parameters on a CPU);
    buffers computed as usual. Every parameter must then be written."""
    import dataclasses

    from accelerate import dispatch_model, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # the head goes where the model's own tie puts it (a checkpoint may store a tied head)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    device_map = dataclasses.replace(placement, tied=tied).device_map(model)
    for name, module in model.named_modules():
        if name not in device_map:
            continue
        device = device_map[name]
        for key, p in module.named_parameters(recurse=False):
            empty = torch.empty_like(p, device=device)
            module._parameters[key] = torch.nn.Parameter(empty, requires_grad=False)
        for key, b in module.named_buffers(recurse=False):
            module._buffers[key] = b.to(device)
    if tied:
        model.tie_weights()  # the head was given memory of its own above: it is the embedding
    if len(set(device_map.values())) > 1:
        model = dispatch_model(model, device_map=device_map)
    return model.eval()


def model_from_recipe(recipe, device: str = "cpu"):
    """(model, tokenizer) of a recipe's merge, built in memory without writing a checkpoint:
    merged on the CPU (the bits `evomerge merge` writes), then moved to `device`. A data-flow
    recipe gives a path model over the loaded source models' layers (shared)."""
    if recipe.data_flow is not None:
        return _path_model(recipe, device)
    from evomerge.merge.engine import open_sources
    from evomerge.merge.placement import Placement
    from evomerge.merge.resident import merge_into_model

    ckpts = open_sources(recipe)
    ref = ckpts[recipe.main_alias]
    model = empty_model(ref.path, recipe.dtype, Placement(("cpu",), ref.info.num_layers))
    # every parameter must be written: the model's own are uninitialized memory (a tied head
    # is the embedding)
    tied = getattr(model.config, "tie_word_embeddings", False)
    written = set(ref.names) | ({"lm_head.weight"} if tied else set())
    missing = [n for n, _ in model.named_parameters() if n not in written]
    if missing:
        raise EvomergeError(f"recipe merge does not fit {ref.path}: missing {missing[:3]}")
    merge_into_model(recipe, ckpts, model)
    return model.to(device).eval(), load_tokenizer(ref.path)


def load_sources(paths: dict, ps_recipe, device: str, dtype: str) -> tuple[dict, dict]:
    """(models, tokenizers) by alias for a data-flow path; alias "ps" is built from `ps_recipe`."""
    from evomerge.merge.recipe import PS

    models, tokenizers = {}, {}
    for alias, path in paths.items():
        if alias == PS:
            models[alias], tokenizers[alias] = model_from_recipe(ps_recipe, device)
        else:
            models[alias], tokenizers[alias] = load_model(path, device, dtype)
    return models, tokenizers


def _path_model(recipe, device: str):
    from evomerge.merge.dataflow import PathModel
    from evomerge.merge.recipe import PS

    df = recipe.data_flow
    used = {df.embed_from, *(h.model for h in df.path)}
    paths = {a: None if a == PS else recipe.models[a].local(f"models.{a}") for a in used}
    models, tokenizers = load_sources(paths, recipe.ps_only(), device, recipe.dtype)
    model = PathModel(models[df.embed_from], models).set_path(
        [(h.model, h.layer, h.scale) for h in df.path]
    )
    return model.eval(), tokenizers[df.embed_from]
