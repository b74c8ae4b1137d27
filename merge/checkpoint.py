"""A model directory on disk: its config and its tensors, read lazily."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch

from evomerge.merge.architecture import ModelInfo, network_order
from evomerge.merge.errors import EvomergeError
from evomerge.merge.safetensors_io import (
    BufferPool,
    TensorEntry,
    map_tensor,
    read_header,
    read_tensor,
)

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


class Checkpoint:
    """Tensors of one model directory, each read from disk only when asked for."""

    def __init__(self, path: Path | str, label: str = "model", allow_pickle: bool = False):
        self.path = Path(path)
        self.label = label
        if not self.path.is_dir():
            raise EvomergeError(f"{label}: model path {self.path} does not exist; fix the path")
        self.info = ModelInfo.from_dir(self.path)
        self._entries: dict[str, TensorEntry] = {}
        self._loaded: dict[str, torch.Tensor] = {}  # pickle checkpoints only (not lazy)
        files = self._safetensors_files()
        if files:
            for f in files:
                self._entries.update(read_header(f))
            return
        pickles = sorted(p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise EvomergeError(f"{label}: no weights (*.safetensors) in {self.path}")
        if not allow_pickle:
            raise EvomergeError(
                f"{label}: {pickles[0]} holds pickle weights, which can run code when loaded; "
                "convert it to safetensors or set allow_pickle: true in the recipe"
            )
        for p in pickles:
            self._loaded.update(torch.load(p, map_location="cpu", weights_only=True))

    def _safetensors_files(self) -> list[Path]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise EvomergeError(f"{index}: corrupt index (no weight_map); re-save it") from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise EvomergeError(f"{index}: lists shard {missing[0].name}, which is missing")
            return files
        return sorted(self.path.glob("*.safetensors"))

    @functools.cached_property
    def names(self) -> list[str]:
        """Tensor names in network order (embeddings, layers, final norm, head)."""
        return network_order(list(self._entries or self._loaded))

    def shape(self, name: str) -> tuple[int, ...]:
        if self._entries:
            return self._entries[name].shape
        return tuple(self._loaded[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name].dtype if self._entries else self._loaded[name].dtype

    def get(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        """The tensor, read now (into a buffer of `pool`, if given: give it back once done)."""
        if name not in self._entries and name not in self._loaded:
            raise EvomergeError(f"{self.label}: tensor {name!r} is missing from {self.path}")
        return read_tensor(self._entries[name], pool) if self._entries else self._loaded[name]

    def pooled(self, name: str) -> bool:
        """Whether `get(name, pool)` reads into a buffer of the pool (not a pickle's tensor)."""
        return bool(self._entries)

    def map(self, name: str) -> torch.Tensor | None:
        """The tensor mapped read-only from the file (safetensors_io.map_tensor), or None."""
        if not self._entries:
            return None
        if name not in self._entries:
            raise EvomergeError(f"{self.label}: tensor {name!r} is missing from {self.path}")
        return map_tensor(self._entries[name])

    def copy_side_files(
        self,
        out: Path,
        dtype: torch.dtype,
        num_layers: int | None = None,
        layer_types: list[str] | None = None,
    ) -> None:
        """config.json (with the output dtype) plus generation and tokenizer files.

        A data-flow export passes its `num_layers` (one per hop) and, for architectures whose
        layers differ (sliding-window and global attention), each hop's `layer_types`."""
        cfg = dict(self.info.raw)
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        if num_layers is not None:
            for key in ("num_hidden_layers", "n_layer"):
                if key in cfg or key == "num_hidden_layers":
                    cfg[key] = num_layers
            if cfg.get("layer_types"):
                if layer_types is None or len(layer_types) != num_layers:
                    raise EvomergeError(
                        f"{self.path}: its config lists layer_types, but not "
                        "every model on the path does; use one architecture"
                    )
                cfg["layer_types"] = layer_types
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for name in SIDE_FILES:
            if (self.path / name).is_file():
                shutil.copy2(self.path / name, out / name)
