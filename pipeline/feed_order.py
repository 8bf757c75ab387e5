"""The order in which a download actor requests a shard's rows: slow hosts first.

A shard ends with its last row. Requested in row order, the last rows of a shard are requested at
its end, and those on slow hosts (a long time to first byte, a retry chain, a queue for the host's
`data.max_connections_per_host` slots) then hold the shard for seconds with nothing else to do:
measured on the internet emulator (`benchmarks/download_internet.py`), each actor spent the last
~9 s of a 33 s shard on ~2% of its rows. So rows are requested in row order, except that a row of a
host whose rows are known to take long is requested early by about that long: `FeedOrder` measures
per host the time from a row's request to its response (an average over its recent rows: host
queue, retries and redirects included) and hands out a row of such a host once the row-order
pointer is within `LEAD_FACTOR x that time x rows requested per second` rows of it (at most
`max_lead` rows ahead). Those rows then end about when their neighbours in row order do, not after
the shard's last request. Hosts seen once teach nothing (a single slow answer at the very end still
holds the shard); a host whose rows are quick stays in row order. The results still come back in
row order (`in_order.InOrder` holds a row pulled ahead until the rows before it are done).

`take` runs on the shard's feeder thread; `finished` on the network thread.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from typing import Callable, Optional

SLOW_S = 1.0  # a host whose rows take longer than this (on average) is requested ahead of row order
LEAD_FACTOR = 2.0  # by twice its average: a host's rows vary (a 6 s answer from a host that averages 3 s)
_WEIGHT = 0.3  # of the newest row in a host's average


def host_of(url: Optional[str]) -> str:
    """The host part of a URL, as a grouping key only (the fetcher does the real parsing); "" for a
    row without one (WebDataset input: its image is staged, not fetched)."""
    if not url:
        return ""
    start = url.find("://")
    rest = url[start + 3 :] if start >= 0 else url
    end = len(rest)
    for sep in "/?#":
        k = rest.find(sep)
        if 0 <= k < end:
            end = k
    return rest[:end].rpartition("@")[2].lower()


class FeedOrder:
    """Row indices 0..n-1 of a shard in the order to request them (see the module doc)."""

    def __init__(self, urls: list[str], max_lead: int, clock: Callable[[], float] = time.monotonic):
        self.n, self.max_lead, self.clock = len(urls), max_lead, clock
        self.hosts = [host_of(u) for u in urls]
        self._rows: dict[str, deque] = {}  # host -> its rows not yet requested, in row order
        for i, host in enumerate(self.hosts):
            self._rows.setdefault(host, deque()).append(i)
        self._started_at = [0.0] * self.n
        self._requested = bytearray(self.n)
        self._next = 0  # the lowest row not yet requested
        self._count = 0  # rows requested
        self._time: dict[str, float] = {}  # host -> average seconds from request to response
        self._slow: set[str] = set()  # the hosts whose average is over SLOW_S
        self._newly_slow: deque = deque()  # hosts that became slow since the last take (network thread)
        self._due: list[tuple[int, int, str]] = []  # heap: (row from which the host's next row is due, that row, host)
        self._in_due: set[str] = set()
        self._t0 = clock()

    def __len__(self) -> int:
        return self.n - self._count

    def take(self, count: int) -> list[int]:
        """The next `count` rows to request (fewer at the end)."""
        now = self.clock()
        rate = self._count / max(now - self._t0, 1.0)  # rows requested per second so far
        while self._newly_slow:
            self._schedule(self._newly_slow.popleft(), rate)
        out: list[int] = []
        while len(out) < count and self._count < self.n:
            while self._requested[self._next]:
                self._next += 1
            if self._due and self._due[0][0] <= self._next:
                _, i, host = heapq.heappop(self._due)
                self._in_due.discard(host)
                self._rows[host].popleft()
                if host in self._slow:  # its next row, due by its lead as of now
                    self._schedule(host, rate)
            else:
                i = self._next
                self._rows[self.hosts[i]].popleft()  # row order: it heads its host's rows too
            self._requested[i] = 1
            self._started_at[i] = now
            self._count += 1
            out.append(i)
        return out

    def _schedule(self, host: str, rate: float) -> None:
        rows = self._rows[host]
        if rows and host not in self._in_due:
            lead = min(int(LEAD_FACTOR * self._time[host] * rate), self.max_lead)
            heapq.heappush(self._due, (rows[0] - lead, rows[0], host))
            self._in_due.add(host)

    def finished(self, i: int) -> None:
        """Row i's response (or its final failure) came back."""
        seconds = self.clock() - self._started_at[i]
        host = self.hosts[i]
        old = self._time.get(host)
        seconds = self._time[host] = seconds if old is None else old + _WEIGHT * (seconds - old)
        if seconds > SLOW_S:
            if host not in self._slow:
                self._slow.add(host)
                self._newly_slow.append(host)
        else:
            self._slow.discard(host)
