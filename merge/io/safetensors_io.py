"""The safetensors format, read a tensor at a time and written as a stream.

Why not `safetensors.safe_open`: it memory-maps whole files, so every byte read stays resident
(and counted) until the file closes, and a truncated file fails deep inside with an opaque error.
Reading with `pread` keeps a merge's memory at a few tensors whatever the model size, and lets us
name the file and tensor at fault. Writing streams each tensor to disk as soon as it is merged:
the layout of every shard is known up front (shapes and dtypes come from the base), so headers
are written first. Files written here are read back with the `safetensors` package in the tests.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import mmap
import os
import struct
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    if not isinstance(header, dict):
        raise EvomergeError(f"{path}: corrupt safetensors header (not a JSON object); {fix}")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        code = info.get("dtype") if isinstance(info, dict) else None
        if isinstance(code, str) and code not in DTYPES:
            raise EvomergeError(
                f"{path}: tensor {name!r} has dtype {code}, which evomerge does not support "
                f"(supported: {', '.join(DTYPES)}); convert the checkpoint to bf16 or fp16"
            )
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (8 + n + int(o) for o in info["data_offsets"])
            if any(d < 0 for d in shape):
                raise ValueError
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


class BufferPool:
    """Byte buffers reused from tensor to tensor (thread-safe).

    Memory fresh from the OS costs a page fault per 4 KiB page on first touch: on the
    development VM 0.34-0.44 s per 400 MB, several times the cost of reading those bytes from the
    page cache (experiments/README, "Merge throughput"). A merge streams tensors of a handful of
    shapes, so a buffer given back is soon taken again at the same size. At most `keep` bytes of
    free buffers are kept (the oldest go first)."""

    def __init__(self, keep: int = 512 << 20):
        self.keep = keep
        self._free: dict[int, list[torch.Tensor]] = {}  # by size, last given first
        self._age: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of exactly `nbytes` (contents undefined)."""
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                buf = free.pop()
                del self._age[id(buf)]
                self._bytes -= nbytes
                return buf
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, tensor: torch.Tensor) -> None:
        """Return a buffer from `take` (or any view of its whole storage)."""
        buf = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
        n = buf.numel()
        with self._lock:
            self._free.setdefault(n, []).append(buf)
            self._age[id(buf)] = buf
            self._bytes += n
            while self._bytes > self.keep:
                _, old = self._age.popitem(last=False)
                self._free[old.numel()] = [b for b in self._free[old.numel()] if b is not old]
                self._bytes -= old.numel()


def map_tensor(entry: TensorEntry) -> torch.Tensor | None:
    """The tensor's bytes mapped read-only from the page cache: no copy, no fresh memory (the
    pages are mapped in one call, MAP_POPULATE). The mapping lives as long as the tensor (and
    counts in RSS as long): the caller must not write to it and should drop it once merged.
    None where mapping does not apply (an empty or misaligned tensor, no mmap here); the file's
    size is checked first, so a file truncated since its header was read is an error here."""
    if entry.nbytes == 0 or entry.begin % entry.dtype.itemsize or not hasattr(mmap, "MAP_POPULATE"):
        return None
    with open(entry.file, "rb") as f:
        if os.fstat(f.fileno()).st_size < entry.end:
            raise EvomergeError(
                f"{entry.file}: truncated while reading a tensor; re-save the checkpoint"
            )
        start = entry.begin - entry.begin % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(
            f.fileno(),
            entry.end - start,
            flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
            prot=mmap.PROT_READ,
            offset=start,
        )
    with warnings.catch_warnings():  # "not writable": nothing writes to a merge's inputs
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(
            m, dtype=torch.uint8, count=entry.nbytes, offset=entry.begin - start
        )
    return flat.view(entry.dtype).reshape(entry.shape)


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor's bytes into non-mapped memory."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    with open(entry.file, "rb") as f:
        f.seek(entry.begin)
        got = f.readinto(memoryview(buf.numpy()))  # type: ignore[arg-type]
    if got != entry.nbytes:
        raise EvomergeError(
            f"{entry.file}: truncated while reading a tensor; re-save the checkpoint"
        )
    return buf.view(entry.dtype).reshape(entry.shape)


def read_range(fd: int, entry: TensorEntry, lo: int, dest: torch.Tensor) -> None:
    """Bytes [lo, lo + len(dest)) of the tensor into `dest` (a contiguous uint8 CPU tensor, e.g.
    a slice of the tensor's final home or a pinned staging buffer) with `pread` on an open
    descriptor: no seek, so threads share one descriptor; the GIL is released while the
    kernel copies, so threads read in parallel."""
    view = memoryview(dest.numpy())  # type: ignore[arg-type]
    pos = entry.begin + lo
    while len(view):
        got = os.preadv(fd, [view], pos)  # may return less (Linux caps one call near 2 GiB)
        if got <= 0:
            raise EvomergeError(
                f"{entry.file}: truncated while reading a tensor; re-save the checkpoint"
            )
        view = view[got:]
        pos += got


# the exponent field of each float format: a value is NaN or inf exactly when every bit of it
# is set (IEEE 754, and bfloat16 is float32's upper half)
_EXPONENT: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}
_CHECK_CHUNK = 1 << 20  # entries per NumPy pass: the scratch stays in cache


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or inf: `torch.isfinite(tensor).all()`, exactly.

    On a CPU, torch's isfinite took 17 s per GB of bf16 here (0.06 GB/s, most of a worker's
    start-up); the same answer read from the exponent bits with NumPy, a cache-sized chunk at a
    time (`max(bits & exponent) == exponent` iff some entry has them all set), runs at 2-4 GB/s
    on one core, releasing the GIL so several threads check at once. Other devices and dtypes
    use torch."""
    if not tensor.is_floating_point():
        return True
    spec = _EXPONENT.get(tensor.dtype)
    if tensor.device.type != "cpu" or spec is None or not tensor.is_contiguous():
        return bool(torch.isfinite(tensor).all())
    int_dtype, exponent = spec
    bits = tensor.reshape(-1).view(int_dtype).numpy()
    scratch = np.empty(min(bits.size, _CHECK_CHUNK), dtype=bits.dtype)
    for lo in range(0, bits.size, _CHECK_CHUNK):
        part = bits[lo : lo + _CHECK_CHUNK]
        masked = np.bitwise_and(part, exponent, out=scratch[: part.size])
        if masked.max() == exponent:
            return False
    return True


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


DIRECT_IO = True  # write shards with O_DIRECT where allowed (_StreamFile)


class _StreamFile:
    """A file written front to back and fsync'd: with O_DIRECT where the OS allows it.

    Buffered writes copy every byte into the page cache, pages the kernel must first allocate:
    on the development VM writing a 594 MB shard that way cost 1.3 s of kernel time (a fifth of
    a whole `evomerge merge`), against 0.1 s with O_DIRECT, which hands the disk our own buffer.
    O_DIRECT needs block-aligned memory, offsets and lengths, so bytes gather in an aligned
    staging buffer written out whole; the last block is padded and the file truncated to its
    size. Where O_DIRECT is refused (no such flag, a filesystem without it), writes are
    buffered. Data is durable once `close` returns, either way."""

    STAGE = 16 << 20  # bytes per direct write (a multiple of every block size)
    BLOCK = 4096

    def __init__(self, path: Path):
        self.path = path
        self._size = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self._direct = DIRECT_IO and hasattr(os, "O_DIRECT")
        try:
            self._fd = os.open(path, flags | (os.O_DIRECT if self._direct else 0), 0o644)
        except OSError:
            self._direct = False
            self._fd = os.open(path, flags, 0o644)
        self._stage: torch.Tensor | None = None
        self._used = 0
        self._flushed = 0  # bytes handed to the file
        if self._direct:
            self._map = mmap.mmap(-1, self.STAGE)  # page-aligned
            self._stage = torch.frombuffer(self._map, dtype=torch.uint8)

    def write(self, data: torch.Tensor) -> None:
        """Append the bytes of a flat uint8 CPU tensor."""
        n = data.numel()
        self._size += n
        if self._stage is None:
            _write_all(self._fd, memoryview(data.numpy()))  # type: ignore[arg-type]
            return
        done = 0
        stage, src = self._stage.numpy(), data.numpy()
        while done < n:
            take = min(n - done, self.STAGE - self._used)
            # NumPy's copy: a torch copy here would start OpenMP threads that then spin
            np.copyto(stage[self._used : self._used + take], src[done : done + take])
            self._used += take
            done += take
            if self._used == self.STAGE:
                self._flush(self.STAGE)

    def _flush(self, length: int) -> None:
        assert self._stage is not None
        try:
            _write_all(self._fd, memoryview(self._map)[:length])
        except OSError as e:
            if e.errno != errno.EINVAL or self._size > length:  # not "O_DIRECT refused" at once
                raise
            fcntl.fcntl(
                self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT
            )
            _write_all(self._fd, memoryview(self._map)[:length])
        self._used = 0

    def close(self) -> None:
        """Write what is staged, fsync, close."""
        try:
            if self._stage is not None and self._used:
                tail = self._used
                padded = -(-tail // self.BLOCK) * self.BLOCK
                self._stage[tail:padded].zero_()
                self._flush(padded)
                os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        finally:
            self.abandon()

    def abandon(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._stage is not None:
            self._stage = None
            # a failed write's frame may still view the map: it is freed with that frame
            with contextlib.suppress(BufferError):
                self._map.close()


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


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
        self._file = _StreamFile(path)
        head = struct.pack("<Q", len(raw)) + raw
        self._file.write(torch.frombuffer(bytearray(head), dtype=torch.uint8))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; tensors must come in the planned order with the planned dtype."""
        expected = self._order[self._next]
        spec = self.specs[name]
        if name != expected or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"writer expected {expected} {spec.dtype} {spec.shape}, got {name}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(data)
        self._next += 1

    def abandon(self) -> None:
        """Close without checking (the output is being discarded)."""
        self._file.abandon()

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: {len(self._order) - self._next} tensors never written")
        self._file.close()

    @property
    def done(self) -> bool:
        return self._next == len(self._order)
