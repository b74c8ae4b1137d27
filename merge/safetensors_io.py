"""The safetensors format, read a tensor at a time and written as a stream.

Why not `safetensors.safe_open`: it memory-maps whole files, so every byte read stays resident
(and counted) until the file closes, and a truncated file fails deep inside with an opaque error.
Reading with `pread` keeps a merge's memory at a few tensors whatever the model size, and lets us
name the file and tensor at fault. Writing streams each tensor to disk as soon as it is merged:
the layout of every shard is known up front (shapes and dtypes come from the base), so headers
are written first. Files written here are read back with the `safetensors` package in the tests.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.merge.errors import EvomergeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in a file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check a safetensors header; a corrupt or truncated file is named, with the fix."""
    fix = "re-download or re-save this checkpoint"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise EvomergeError(f"{path}: truncated safetensors file (no header); {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise EvomergeError(f"{path}: corrupt safetensors header (length {n}); {fix}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EvomergeError(f"{path}: corrupt safetensors header (not JSON); {fix}") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (8 + n + int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise EvomergeError(
                f"{path}: corrupt header entry for tensor {name!r}; {fix}"
            ) from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 8 + n:
            raise EvomergeError(f"{path}: tensor {name!r} has inconsistent offsets; {fix}")
        if end > size:
            raise EvomergeError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} but the file has {size}; {fix}"
            )
        entries[name] = TensorEntry(path, dtype, shape, begin, end)
    return entries


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor's bytes into fresh (non-mapped) memory."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    with open(entry.file, "rb") as f:
        f.seek(entry.begin)
        got = f.readinto(memoryview(buf.numpy()))  # type: ignore[arg-type]
    if got != entry.nbytes:
        raise EvomergeError(
            f"{entry.file}: truncated while reading a tensor; re-save the checkpoint"
        )
    return buf.view(entry.dtype).reshape(entry.shape)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def plan_shards(specs: Iterable[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `max_shard_size` bytes (a bigger tensor
    gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


class ShardWriter:
    """Writes one safetensors file whose header is known before any tensor is merged."""

    def __init__(self, path: Path, specs: list[TensorSpec]):
        self.path = path
        self.specs = {s.name: s for s in specs}
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in specs:
            header[s.name] = {
                "dtype": CODES[s.dtype],
                "shape": list(s.shape),
                "data_offsets": [offset, offset + s.nbytes],
            }
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
        self._order = [s.name for s in specs]
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; tensors must come in the planned order with the planned dtype."""
        expected = self._order[self._next]
        spec = self.specs[name]
        if name != expected or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"writer expected {expected} {spec.dtype} {spec.shape}, got {name}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))  # type: ignore[arg-type]
        self._next += 1

    def abandon(self) -> None:
        """Close without checking (the output is being discarded)."""
        self._file.close()

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: {len(self._order) - self._next} tensors never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    @property
    def done(self) -> bool:
        return self._next == len(self._order)
