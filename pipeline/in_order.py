"""The download actor's rows in flight: `InOrder` hands a shard's results back in row order,
`Permits` bounds how many rows are under way, `Gauge` counts them.

`InOrder`: results of a shard's rows, filled in any order by any thread, read in row order.

The download actor finishes rows in the order their servers answer; the shard is written in row
order. Producers `put(i, result)` from the decoder threads; the consumer iterates and gets row 0, 1,
2, ... each once it and the rows before it are done. The consumer wakes once per `chunk` of finished
rows, not once per row (one Condition notify per chunk instead of one per row).

`fail(exc)` hands a producer's unexpected exception to the consumer, which raises it. `close()` (the
consumer gave up: an aborted shard) makes later `put`s no-ops and tells producers (`closed`) to stop
starting rows.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class InOrder(Generic[T]):
    """Slots for `n` results; iterate to get them in index order."""

    def __init__(self, n: int, chunk: int = 32):
        self.n, self.chunk = n, chunk
        self._results: list[Any] = [None] * n
        self._left = [min(chunk, n - start) for start in range(0, n, chunk)]  # unfinished rows per chunk
        self._changed = threading.Condition(threading.Lock())
        self._failure: Optional[BaseException] = None
        self.closed = False

    def put(self, i: int, result: T) -> None:
        """Row i is done (any thread; each row once)."""
        if self.closed:
            return
        self._results[i] = result
        c = i // self.chunk
        with self._changed:
            self._left[c] -= 1
            if not self._left[c]:
                self._changed.notify_all()

    def fail(self, exc: BaseException) -> None:
        """A producer failed: the consumer raises `exc` at its next wait."""
        with self._changed:
            if self._failure is None:
                self._failure = exc
            self._changed.notify_all()

    def close(self) -> None:
        self.closed = True

    def __iter__(self) -> Iterator[T]:
        try:
            for c, start in enumerate(range(0, self.n, self.chunk)):
                with self._changed:
                    while self._left[c] and self._failure is None:
                        self._changed.wait()
                    if self._failure is not None:
                        raise self._failure
                for i in range(start, min(self.n, start + self.chunk)):
                    result, self._results[i] = self._results[i], None
                    yield result
        finally:
            self.close()


class Permits:
    """A counting semaphore taken in batches by the feeder, one at a time by the network thread.

    `take(n)` (the feeder) waits until at least `min(n, batch)` permits are free and takes up to n;
    waiters wake once per `batch` returns, not once per return (the feeder then starts a batch of
    requests in one hand-off). `try_take()` (the network thread, which must not block) takes one
    if one is free; otherwise it files a claim, and the next permit given back goes to the oldest
    claim, through `on_handoff()`, before the feeder sees it. `free` never goes below zero: at most
    `total` permits are held at any time."""

    def __init__(self, total: int, batch: int, on_handoff: Optional[Callable[[], None]] = None):
        self.free = total
        self.batch = max(1, min(batch, total))
        self.on_handoff = on_handoff
        self._claims = 0
        self._cond = threading.Condition(threading.Lock())

    def take(self, n: int) -> int:
        want = min(n, self.batch)
        with self._cond:
            while self.free < want:
                self._cond.wait()
            got = min(n, self.free)
            self.free -= got
            return got

    def try_take(self) -> bool:
        """One permit now (True), or a claim that `on_handoff` settles later (False)."""
        with self._cond:
            if self.free > 0:
                self.free -= 1
                return True
            self._claims += 1
            return False

    def give(self, n: int = 1) -> None:
        with self._cond:
            handed = min(n, self._claims)
            self._claims -= handed
            n -= handed
            if n:
                self.free += n
                if self.free >= self.batch and self.free - n < self.batch:
                    self._cond.notify_all()
        for _ in range(handed):
            self.on_handoff()


class Gauge:
    """A count that goes up and down from several threads, with its high-water mark."""

    def __init__(self) -> None:
        self.value = self.peak = 0
        self._lock = threading.Lock()

    def up(self) -> None:
        with self._lock:
            self.value += 1
            if self.value > self.peak:
                self.peak = self.value

    def down(self) -> None:
        with self._lock:
            self.value -= 1
