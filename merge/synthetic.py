"""Small random checkpoint families (a base plus experts = base + task vectors), made offline.

For tests, the merge benchmark and examples: real transformers checkpoints of any supported
family, with no training. The trained zoo with real skills lives in `fitness.zoo`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


def tiny_config(model_type: str = "llama", **overrides):
    """A tiny config of a family; GPT-2 and GPT-NeoX take their own field names."""
    if model_type == "gpt2":
        kw = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    elif model_type == "gpt_neox":
        kw = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
        )
    else:
        kw = dict(TINY)
        if model_type in ("gemma", "gemma2", "gemma3_text", "qwen3"):
            kw["head_dim"] = 8
    if model_type == "phi3":
        kw.update(pad_token_id=0, eos_token_id=2, bos_token_id=1)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def save_model(state: dict[str, torch.Tensor], config, out: Path, shards: int = 1) -> Path:
    """A model directory; with `shards` > 1 the tensors are dealt round-robin (a layer's tensors
    land in different files) over `model-0000i-of-0000n.safetensors`, with the index json."""
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in state.items()}
    if shards <= 1:
        save_file(state, out / "model.safetensors")
        return out
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {name: files[i % shards] for i, name in enumerate(state)}
    for f in files:
        save_file({k: v for k, v in state.items() if weight_map[k] == f}, out / f)
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def make_family(
    out: Path,
    model_type: str = "llama",
    experts: int = 2,
    delta_scale: float = 0.02,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    **config_overrides,
) -> dict[str, Path]:
    """Write `base` and `expert1..N` under `out`; returns alias -> directory.

    In bf16 the experts are base + task vector rounded to bf16, so their task vectors take few
    distinct values (many exact ties in magnitude), as real bf16 fine-tunes do."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **config_overrides)
    model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    # save_pretrained's view of the weights: tied heads are stored once
    base = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        base = {k: v for k, v in base.items() if k != "lm_head.weight"}
    paths = {"base": save_model(base, config, out / "base", shards)}
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(1, experts + 1):
        state = {
            k: (
                v.float()
                + delta_scale * torch.randn(v.shape, generator=g) * v.float().std().clamp_min(1e-3)
            ).to(dtype)
            if v.is_floating_point()
            else v
            for k, v in base.items()
        }
        paths[f"expert{i}"] = save_model(state, config, out / f"expert{i}", shards)
    return paths
