"""Reading ahead and writing behind on two threads: a merge's disk I/O (which releases the GIL)
overlapped with its arithmetic, in windows bounded in bytes so peak memory is a few tensors."""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_DONE = object()


class ByteBudget:
    """Bytes in flight between two threads: taking waits while the window is full, except that
    one item is always let through (a tensor bigger than the window still moves, alone)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cv = threading.Condition()
        self._closed = False

    def take(self, n: int) -> bool:
        """Wait for room for n bytes; False once closed."""
        with self._cv:
            while not self._closed and self.used and self.used + n > self.limit:
                self._cv.wait()
            if self._closed:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class ReadAhead(Generic[T]):
    """Iterate `load(item)` over `items` in order, loading in a background thread up to `window`
    bytes (`size(item)`) ahead of the consumer. Errors in `load` are raised by the iterator, in
    order; closing the iterator (or leaving a `with` block) stops the thread."""

    def __init__(
        self,
        items: Iterable[object],
        load: Callable[[object], T],
        size: Callable[[object], int],
        window: int,
    ):
        self._budget = ByteBudget(window)
        self._queue: queue.Queue = queue.Queue()
        self._size = size
        self._thread = threading.Thread(
            target=self._run, args=(list(items), load), name="evomerge-read", daemon=True
        )
        self._thread.start()

    def _run(self, items: list[object], load: Callable[[object], T]) -> None:
        try:
            for item in items:
                n = self._size(item)
                if not self._budget.take(n):
                    return
                self._queue.put((item, load(item), n))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put(e)
            return
        self._queue.put(_DONE)

    def __iter__(self) -> Iterator[tuple[object, T, Callable[[], None]]]:
        """(item, loaded, release): call release() once done with `loaded` to let the reader on."""
        while True:
            got = self._queue.get()
            if got is _DONE:
                return
            if isinstance(got, BaseException):
                raise got
            item, loaded, n = got
            yield item, loaded, functools.partial(self._budget.give, n)

    def close(self) -> None:
        self._budget.close()
        self._thread.join()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WriteBehind:
    """Run `write(item)` in a background thread, in submission order, with at most `window`
    bytes submitted and not yet written. The first error is raised by the next `submit` or by
    `finish`; after an error, further items are dropped."""

    def __init__(self, write: Callable[[object], None], window: int):
        self._write = write
        self._budget = ByteBudget(window)
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="evomerge-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            got = self._queue.get()
            if got is _DONE:
                return
            item, n = got
            try:
                if self._error is None:
                    self._write(item)
            except BaseException as e:  # noqa: BLE001 - raised in the submitting thread
                self._error = e
            finally:
                self._budget.give(n)

    def submit(self, item: object, nbytes: int) -> None:
        if self._error is not None:
            raise self._error
        self._budget.take(nbytes)
        self._queue.put((item, nbytes))

    def finish(self) -> None:
        """Wait until everything submitted is written; raise the first error."""
        self._queue.put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """Stop after the item being written (an error elsewhere: the output is discarded)."""
        self._error = self._error or RuntimeError("abandoned")
        self._queue.put(_DONE)
        self._thread.join()
