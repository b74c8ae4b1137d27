"""Random masks from a counter-based generator: each entry's draw is a hash of its position.

A sequential generator (torch's CPU Mersenne Twister) runs on one thread, in order, and its mask
is copied to the device: ~90 M entries/s, minutes per candidate at 7B. Wellons' lowbias32 of the
position (times an odd multiplier) xored with the stream's key gives the same bits for every
chunk, thread and device: integer arithmetic, and the uniform is the top 24 bits times 2^-24,
exact in fp32. Streams and the `masks: torch` recipes: docs/ARCHITECTURE.md, "The recipe".
"""

from __future__ import annotations

import numpy as np
import torch

M32 = 0xFFFFFFFF
SPREAD = 0x9E3779B1  # odd: position -> position * SPREAD mod 2^32 is a bijection
MUL1, MUL2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers
SCALE = 2.0**-24
MAX_ENTRIES = 1 << 32  # positions are 32-bit


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * MUL1) & M32
    x ^= x >> 15
    x = (x * MUL2) & M32
    return x ^ (x >> 16)


def stream_key(seed: int, stream: int) -> int:
    """The 32-bit key of a tensor's `stream`-th draw (its seed: engine.tensor_seed)."""
    k = _lowbias32((seed & M32) ^ _lowbias32(stream + 1))
    return _lowbias32(k ^ ((seed >> 32) & M32))


def uniform_np(key: int, lo: int, hi: int) -> np.ndarray:
    """The fp32 uniforms in [0, 1) of positions lo .. hi - 1 of a stream (CPU, NumPy)."""
    x = np.arange(lo, hi, dtype=np.uint32)
    x *= np.uint32(SPREAD)
    x ^= np.uint32(key)
    x ^= x >> np.uint32(16)
    x *= np.uint32(MUL1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(MUL2)
    x ^= x >> np.uint32(16)
    x >>= np.uint32(8)
    out = x.astype(np.float32)
    out *= np.float32(SCALE)
    return out


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x < 2^32, with no product past 2^48 (torch has few uint32
    ops on every device; int64 overflow is not to be relied on)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def uniform_torch(key: int, lo: int, hi: int, device: torch.device | str) -> torch.Tensor:
    """`uniform_np` on any torch device: the same bits."""
    x = torch.arange(lo, hi, dtype=torch.int64, device=device)
    x = _mul32(x, SPREAD) ^ key
    x ^= x >> 16
    x = _mul32(x, MUL1)
    x ^= x >> 15
    x = _mul32(x, MUL2)
    x ^= x >> 16
    return (x >> 8).to(torch.float32) * SCALE


class CounterDraws:
    """The random draws of one tensor's merge: stream 0 for its first draw (the first merged
    model), stream 1 for the next, ... as a sequential generator's successive draws."""

    def __init__(self, seed: int, offset: int = 0):
        self.seed = seed
        self.offset = offset  # the first entry's position: a chunk's draws are its own
        self.streams = 0

    def next_key(self) -> int:
        key = stream_key(self.seed, self.streams)
        self.streams += 1
        return key

    def uniform(self, shape: torch.Size | tuple[int, ...], device: torch.device | str):
        """The next stream's draws for a whole tensor of `shape`, on `device`."""
        n = int(np.prod(shape)) if len(shape) else 1
        lo, hi = self.offset, self.offset + n
        if hi > MAX_ENTRIES:
            raise ValueError(f"entries up to {hi}: counter masks take at most 2^32")
        key = self.next_key()
        if torch.device(device).type == "cpu":
            return torch.from_numpy(uniform_np(key, lo, hi)).reshape(shape)
        return uniform_torch(key, lo, hi, device).reshape(shape)


def uniform(generator, shape, device) -> torch.Tensor:
    """A draw of `shape` from a recipe's generator: counter draws on `device`; a sequential
    torch.Generator's on the CPU (where its bits are defined)."""
    if isinstance(generator, CounterDraws):
        return generator.uniform(shape, device)
    return torch.rand(shape, generator=generator)


Generator = torch.Generator | CounterDraws  # what a recipe's random methods draw from
