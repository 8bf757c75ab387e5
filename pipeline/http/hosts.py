"""Per-host politeness and dead-host skipping for the fetcher (network thread only).

`HostSlots` lets at most `per_host` requests run at a time per host (name and port); the others wait
in order for a slot. The limit keeps one big host from being hammered, but it also serialises a
dead host's rows: 50 rows of a host that accepts connections and never answers would hold its 8
slots for 50 / 8 x 10 s, and with two retries three times that, while their shard waits for its
last row; a host that resets every connection after a slow accept does the same (measured on the
internet emulator, seed 2: one such host held a 20 s shard to 42 s). So a request that failed
without an answer (it timed out, or the connection was refused or reset before a response head)
puts its host on one request at a time until it answers again (the requests already out go on);
and a host whose last `down_after` requests all failed so, with no answer from it in between, is
skipped for `down_for_s`: its requests end at once with the last failure's reason (`timeout` or
`connection_error`: rows the host would have failed anyway; `data.retry_rejects` reruns them
later). Any answer, even an error status, clears the count. `down_after=0` never skips (the
one-at-a-time rule still holds).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Hashable, Optional


class HostSlots:
    """Slots, waiting lines and time-out counts per host key."""

    def __init__(self, per_host: int, down_after: int, down_for_s: float):
        self.per_host, self.down_after, self.down_for_s = per_host, down_after, down_for_s
        self._busy: dict[Hashable, int] = {}
        self._waiting: dict[Hashable, deque] = {}
        self._failures: dict[Hashable, int] = {}  # consecutive failures, for hosts with at least one
        self._reason: dict[Hashable, str] = {}  # the last one's reason
        self._down_until: dict[Hashable, float] = {}

    def _limit(self, key: Hashable) -> int:
        return 1 if key in self._failures else self.per_host

    def take(self, key: Hashable, waiter: Any) -> bool:
        """Take a slot of `key` (True), or put `waiter` in its line (False: `give` hands it one)."""
        busy = self._busy.get(key, 0)
        if busy < self._limit(key):
            self._busy[key] = busy + 1
            return True
        self._waiting.setdefault(key, deque()).append(waiter)
        return False

    def give(self, key: Hashable) -> Optional[Any]:
        """Return a slot of `key`; the next waiter in its line, if its turn has come, now holds it."""
        busy = self._busy[key] - 1
        waiting = self._waiting.get(key)
        if waiting and busy < self._limit(key):
            return self._next(key, waiting)
        if busy:
            self._busy[key] = busy
        else:
            del self._busy[key]
        return None

    def _next(self, key: Hashable, waiting: deque) -> Any:
        nxt = waiting.popleft()
        if not waiting:
            del self._waiting[key]
        return nxt

    def skipped(self, key: Hashable, now: float) -> Optional[tuple[str, str]]:
        """(reason, detail) why requests to `key` are not sent now, or None."""
        until = self._down_until.get(key)
        if until is None:
            return None
        if now >= until:  # try again; one more failure skips it again
            del self._down_until[key]
            return None
        reason = self._reason.get(key, "timeout")
        return reason, (
            f"not sent: the host's last {self._failures.get(key, 0)} requests failed without an answer "
            f"(the last: {reason}); it is skipped for another {until - now:.0f}s"
        )

    def failed(self, key: Hashable, now: float, reason: str) -> None:
        """A request to `key` ended without an answer: `timeout` or `connection_error`."""
        if len(self._failures) > 100_000:  # hosts that fail and are never heard of again
            self._failures.clear()
            self._reason.clear()
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        self._reason[key] = reason
        if self.down_after and count >= self.down_after:
            self._down_until[key] = now + self.down_for_s

    def answered(self, key: Hashable) -> list[Any]:
        """The host answered: back to `per_host` slots; returns the waiters that now hold one."""
        if key not in self._failures:
            return []
        del self._failures[key]
        self._reason.pop(key, None)
        self._down_until.pop(key, None)
        started = []
        waiting = self._waiting.get(key)
        while waiting and self._busy.get(key, 0) < self.per_host:
            self._busy[key] = self._busy.get(key, 0) + 1
            started.append(self._next(key, waiting))
            waiting = self._waiting.get(key)
        return started
