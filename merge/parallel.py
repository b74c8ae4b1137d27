"""Threads for merging: how many, and a pool that splits one tensor's chunks between them.

Each Python thread runs one intra-op torch thread, for two reasons. torch's OpenMP threads
busy-wait for descheduled partners (a loaded machine slowed merges ~8x, experiments/README),
where threads taking chunks from a counter never wait for one another. And torch splits its
reductions by the intra-op thread count (an 11.5M-entry `sum()` differs between 1 and 2
threads), so merges that reduce (slerp's norms, the L1 rescale) run on one thread and rebuild
bit-identically under any load.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from evomerge.merge.errors import EvomergeError

THREADS_ENV = "EVOMERGE_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def merge_threads(requested: int | None = None) -> int:
    """Threads for a merge: `requested`, else EVOMERGE_THREADS, else the available CPUs less the
    1-minute load average (rounded), at least 1."""
    if requested is None and os.environ.get(THREADS_ENV, "").strip():
        try:
            requested = int(os.environ[THREADS_ENV])
        except ValueError:
            raise EvomergeError(
                f"{THREADS_ENV}={os.environ[THREADS_ENV]!r}: use a whole number of threads"
            ) from None
    if requested is not None:
        return max(1, requested)
    n = available_cpus()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(n, round(n - load)))


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op torch thread in the calling thread for the duration (restored after)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _one_thread() -> None:
    torch.set_num_threads(1)


class Workers:
    """The calling thread plus `threads - 1` helpers, each with one intra-op torch thread, and
    per-thread scratch buffers that live as long as the pool (reused across tensors and
    candidates: no allocation, no page faults in the steady state)."""

    def __init__(self, threads: int = 1):
        self.threads = max(1, threads)
        self._pool = (
            ThreadPoolExecutor(self.threads - 1, "evomerge-merge", initializer=_one_thread)
            if self.threads > 1
            else None
        )
        self._local = threading.local()

    def scratch(self, key: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """This thread's buffer `key` of at least n entries (a view of n), grown as needed."""
        try:
            bufs = self._local.bufs
        except AttributeError:
            bufs = self._local.bufs = {}
        buf = bufs.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = bufs[key] = torch.empty(n, dtype=dtype)
        return buf if buf.numel() == n else buf[:n]

    def run(self, blocks: int, fn: Callable[[int], None]) -> None:
        """fn(0) .. fn(blocks - 1), each exactly once, over the threads (order unspecified).

        Blocks are taken from a shared counter: a thread the OS deschedules delays nothing but
        its own block. The first exception is raised here once every thread has stopped."""
        if blocks <= 0:
            return
        if self._pool is None or blocks == 1:
            with single_thread():
                for i in range(blocks):
                    fn(i)
            return
        counter = itertools.count()
        failed: list[BaseException] = []

        def loop() -> None:
            while not failed:
                i = next(counter)  # atomic under the GIL
                if i >= blocks:
                    return
                try:
                    fn(i)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                    failed.append(e)
                    return

        futures = [self._pool.submit(loop) for _ in range(min(self.threads, blocks) - 1)]
        with single_thread():
            loop()
        for f in futures:
            f.result()
        if failed:
            raise failed[0]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
