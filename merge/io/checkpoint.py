"""A model directory on disk: its config and its tensors, read lazily."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch

from evomerge.merge.architecture import ModelInfo, layer_indices, network_order
from evomerge.merge.errors import EvomergeError
from evomerge.merge.io.safetensors_io import (
    TensorEntry,
    all_finite,
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
            what = "is a file, not a model directory" if self.path.exists() else "does not exist"
            raise EvomergeError(f"{label}: model path {self.path} {what}; fix the path")
        self.info = ModelInfo.from_dir(self.path)
        self._entries: dict[str, TensorEntry] = {}
        self._loaded: dict[str, torch.Tensor] = {}  # pickle checkpoints only (not lazy)
        files = self._safetensors_files()
        if files:
            for f in files:
                self._entries.update(read_header(f))
            self._check_layers()
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
            try:  # weights_only: tensors and plain containers, never arbitrary objects
                self._loaded.update(torch.load(p, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - torch's refusal names an unsafe workaround
                first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                raise EvomergeError(
                    f"{label}: {p} cannot be loaded as plain tensors ({first}); convert the "
                    "checkpoint to safetensors with the tool that wrote it"
                ) from None
        self._check_layers()

    def _check_layers(self) -> None:
        """The layers the weights have are the layers config.json says."""
        found = layer_indices(list(self._entries or self._loaded))
        if found and found != set(range(self.info.num_layers)):
            raise EvomergeError(
                f"{self.label}: {self.path / 'config.json'} says {self.info.num_layers} layers, but "
                f"the weights have layers {min(found)}..{max(found)} ({len(found)}); "
                "the config does not belong to these weights"
            )

    def _safetensors_files(self) -> list[Path]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
                files = sorted({self.path / str(f) for f in weight_map.values()})
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise EvomergeError(f"{index}: corrupt index (no weight_map); re-save it") from None
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

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read now."""
        self._known(name)
        if self._entries:
            return self._finite(name, read_tensor(self._entries[name]))
        return self._finite(name, self._loaded[name])

    def map(self, name: str) -> torch.Tensor | None:
        """The tensor mapped read-only from the file (safetensors_io.map_tensor), or None."""
        if not self._entries:
            return None
        self._known(name)
        mapped = map_tensor(self._entries[name])
        return None if mapped is None else self._finite(name, mapped)

    def _known(self, name: str) -> None:
        if name not in self._entries and name not in self._loaded:
            raise EvomergeError(f"{self.label}: tensor {name!r} is missing from {self.path}")

    def _finite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """NaN or inf in a source would be hidden by some merges (TIES drops what it cannot
        compare) and must never reach a merged model silently."""
        if not all_finite(tensor):
            raise self.not_finite(name)
        return tensor

    def not_finite(self, name: str) -> EvomergeError:
        return EvomergeError(
            f"{self.label}: tensor {name!r} in {self.path} holds NaN or inf values; the "
            "checkpoint is damaged: re-download or re-save it"
        )

    def entry(self, name: str) -> TensorEntry | None:
        """Where the tensor's bytes lie on disk (None for a pickle checkpoint, held in memory)."""
        self._known(name)
        return self._entries.get(name)

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
