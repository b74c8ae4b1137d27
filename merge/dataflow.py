"""Data-flow-space merging: the path of the hidden state through layers of several models.

In memory, a path model reuses the source models' decoder layers (no weight copies): each hop
wraps a source layer, scales the incoming hidden state, and takes its own KV-cache slot.

Exported, it is a plain checkpoint of the embedding model's architecture with one layer per hop.
In a pre-norm network every read of the residual stream goes through a norm that is invariant
to positive scaling, so scaling the stream by the cumulative product C_k of the scales up to hop
k equals dividing what hop k writes into the stream by C_k. Usually the writers are the output
projections (weights and biases divided by C_k). In Gemma 2/3 each sublayer's output passes
through its own RMSNorm, whose gain is (1 + w), before the residual add: there the writer is that
norm, and (1 + w) / C_k is written as w' = (1 + w) / C_k - 1. The export is exact up to the
norms' epsilon and needs no custom code. Architectures without a known set of residual writers
are refused.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

from torch import nn

from evomerge.merge.errors import EvomergeError

# model_type -> (attribute path of the decoder-layer list, residual-writing modules in a layer,
# the writers' gain offset: a writer's parameter t is folded as (t + offset) / C - offset)
FAMILIES: dict[str, tuple[str, tuple[str, ...], float]] = {
    **{
        t: ("model.layers", ("self_attn.o_proj", "mlp.down_proj"), 0.0)
        for t in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
    },
    **{
        t: ("model.layers", ("post_attention_layernorm", "post_feedforward_layernorm"), 1.0)
        for t in ("gemma2", "gemma3_text")
    },
    "gpt2": ("transformer.h", ("attn.c_proj", "mlp.c_proj"), 0.0),
    "gpt_neox": ("gpt_neox.layers", ("attention.dense", "mlp.dense_4h_to_h"), 0.0),
}


def family(model_type: str) -> tuple[str, tuple[str, ...], float]:
    if model_type not in FAMILIES:
        raise EvomergeError(
            f"data-flow merging of model_type {model_type!r} is not supported: its scales cannot "
            f"be folded exactly (supported: {', '.join(FAMILIES)})"
        )
    return FAMILIES[model_type]


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def layers_of(model: Any) -> nn.ModuleList:
    return _get(model, family(model.config.model_type)[0])


class Hop(nn.Module):
    """One step of a path: a shared source layer, a scale on its input, its own cache slot."""

    def __init__(self, layer: nn.Module, index: int, scale: float):
        super().__init__()
        self.layer = layer
        self.index: int = index
        self.scale: float = scale
        # attention modules find their KV-cache slot through `layer_idx`
        self._indexed = [m for m in layer.modules() if hasattr(m, "layer_idx")]

    def forward(self, hidden_states, *args, **kwargs):
        # the layer may appear at several hops: its cache slot is set on every call
        for m in self._indexed:
            setattr(m, "layer_idx", self.index)  # noqa: B010
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        return self.layer(hidden_states, *args, **kwargs)


class PathModel:
    """Builds and re-wires one causal LM whose layers are hops over resident source layers."""

    def __init__(self, embed_model: Any, sources: dict[str, Any]):
        self.embed_model = embed_model
        self.sources = sources
        self.list_path = family(embed_model.config.model_type)[0]
        types = {m.config.model_type for m in [embed_model, *sources.values()]}
        if len(types) != 1:
            raise EvomergeError(
                f"data-flow models must share one architecture, got {sorted(types)}"
            )
        # a shallow structural copy: every module is shared except the containers we rewire
        self.model = copy.copy(embed_model)
        self.model._modules = dict(embed_model._modules)
        self.model.config = copy.deepcopy(embed_model.config)
        parent_path, _, attr = self.list_path.rpartition(".")
        parent = _get(embed_model, parent_path)
        self.parent = copy.copy(parent)
        self.parent._modules = dict(parent._modules)
        self.parent.config = self.model.config
        self.model._modules[parent_path.split(".")[0]] = self.parent
        self.attr = attr

    def set_path(self, path: list[tuple[str, int, float]]) -> Any:
        """Rewire to `path` = [(model alias, layer index, scale)]; returns the (same) model."""
        hops = []
        for k, (alias, layer, scale) in enumerate(path):
            source_layers = layers_of(self.sources[alias])
            if not 0 <= layer < len(source_layers):
                raise EvomergeError(f"data_flow.path[{k}]: {alias} has no layer {layer}")
            if not scale > 0:
                raise EvomergeError(f"data_flow.path[{k}]: scale {scale} must be positive")
            hops.append(Hop(source_layers[layer], k, scale))
        self.parent._modules[self.attr] = nn.ModuleList(hops)
        cfg = self.model.config
        cfg.num_hidden_layers = len(hops)
        if hasattr(cfg, "n_layer"):
            cfg.n_layer = len(hops)
        layer_types = getattr(self.embed_model.config, "layer_types", None)
        if layer_types:
            cfg.layer_types = [
                getattr(self.sources[a].config, "layer_types", layer_types)[i] for a, i, _ in path
            ]
        return self.model


def folded_layer_tensors(
    names: list[str], layer: int, hop: int, cumulative_scale: float, model_type: str
) -> Iterator[tuple[str, str, float, float]]:
    """(source name, exported name, divisor, offset) for one hop's tensors, renamed; a residual
    writer's tensor t becomes (t + offset) / divisor - offset, any other is copied (divisor 1)."""
    list_path, writers, offset = family(model_type)
    pattern = re.compile(rf"(^|\.)(layers|h)\.{layer}\.")
    for name in names:
        if not pattern.search(name):
            continue
        new = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}.{hop}.", name, count=1)
        inner = pattern.split(name, maxsplit=1)[-1]
        if any(inner.startswith(w + ".") for w in writers):
            yield name, new, cumulative_scale, offset
        else:
            yield name, new, 1.0, 0.0
