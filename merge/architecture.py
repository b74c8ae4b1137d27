"""Where each tensor of a checkpoint sits: a layer index, or the embed / head / final-norm group.

One rule set covers the Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, GPT-2 and GPT-NeoX families:
decoder layers are found as `<prefix>.<layers|h|blocks>.<N>.`, so an unlisted decoder-only
architecture works too; the names of embeddings, heads and final norms are listed per family.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evomerge.merge.errors import EvomergeError

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_EMBED = {
    "embed_tokens",
    "wte",
    "wpe",
    "embed_in",
    "word_embeddings",
    "tok_embeddings",
    "embed_positions",
}
_HEAD = {"lm_head", "embed_out", "output"}
_FINAL_NORM = {"norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f"}
_ATTENTION = {"self_attn", "attn", "attention"}
_MLP = {"mlp", "feed_forward", "ffn"}

Group = Literal["embed", "layer", "final_norm", "head"]
Kind = Literal["attention", "mlp", "other"]
KINDS: tuple[Kind, ...] = ("attention", "mlp", "other")


@dataclass(frozen=True)
class Slot:
    """The place of one tensor in the network."""

    group: Group
    layer: int | None = None  # set for group == "layer"
    kind: Kind = "other"  # attention / mlp / other (norms, ...) inside a layer


def classify(name: str) -> Slot:
    """Map a tensor name to its slot, or raise naming the tensor."""
    parts = name.split(".")
    m = _LAYER.search(name)
    if m:
        kind: Kind = "other"
        if _ATTENTION & set(parts):
            kind = "attention"
        elif _MLP & set(parts):
            kind = "mlp"
        return Slot("layer", int(m.group(1)), kind)
    if _EMBED & set(parts):
        return Slot("embed")
    if parts[0] in _HEAD:
        return Slot("head")
    if _FINAL_NORM & set(parts[:-1]):
        return Slot("final_norm")
    raise EvomergeError(
        f"tensor {name!r}: cannot tell which layer or group it belongs to; "
        "evomerge supports decoder-only models with '<prefix>.layers.<N>.' style names"
    )


def layer_indices(names: list[str]) -> set[int]:
    """The decoder-layer indices that tensor names mention."""
    return {int(m.group(1)) for n in names if (m := _LAYER.search(n))}


_GROUP_ORDER = {"embed": 0, "layer": 1, "final_norm": 2, "head": 3}


def network_order(names: list[str]) -> list[str]:
    """Names sorted as data flows: embeddings, layers in order, final norm, head."""

    def key(name: str) -> tuple[int, int, str]:
        try:
            slot = classify(name)
        except EvomergeError:
            return (4, 0, name)
        return (_GROUP_ORDER[slot.group], slot.layer or 0, name)

    return sorted(names, key=key)


@dataclass(frozen=True)
class ModelInfo:
    """What config.json says about a checkpoint's architecture."""

    model_type: str
    architectures: tuple[str, ...]
    num_layers: int
    vocab_size: int | None
    tie_word_embeddings: bool
    raw: dict

    @classmethod
    def from_dir(cls, path: Path) -> ModelInfo:
        """What a model directory's config.json says; a config that asks for the folder's own
        Python code (`auto_map`) is refused: evomerge never runs code a model folder ships."""
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise EvomergeError(f"{cfg_path}: missing; a model directory needs its config.json")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = f"{e.msg}, line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not text"
            raise EvomergeError(f"{cfg_path}: not valid JSON ({why})") from None
        if not isinstance(cfg, dict):
            raise EvomergeError(
                f"{cfg_path}: a {type(cfg).__name__}, not a JSON object; re-save it"
            )
        if cfg.get("auto_map"):
            raise EvomergeError(
                f"{cfg_path}: the model needs its own Python code (auto_map); evomerge never runs "
                "code from a model folder: use a model whose architecture transformers ships"
            )
        text = cfg.get("text_config", cfg)  # multimodal wrappers keep the decoder config inside
        if not isinstance(text, dict):
            raise EvomergeError(f"{cfg_path}: text_config is not a JSON object; re-save it")
        layers = text.get("num_hidden_layers", text.get("n_layer"))
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise EvomergeError(f"{cfg_path}: no positive integer num_hidden_layers (or n_layer)")
        return cls(
            model_type=str(cfg.get("model_type", "")),
            architectures=tuple(cfg.get("architectures") or ()),
            num_layers=layers,
            vocab_size=text.get("vocab_size"),
            tie_word_embeddings=bool(
                cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
            ),
            raw=cfg,
        )
