"""FeedOrder: every row is requested exactly once; row order until a host is measured slow, then
that host's rows come early by about its measured time's worth of rows, never more than max_lead."""

from __future__ import annotations

import random

import pytest

from pipeline.feed_order import FeedOrder, host_of


@pytest.mark.parametrize(
    "url,host",
    [
        ("http://Example.COM/a.jpg", "example.com"),
        ("https://user:secret@cdn.example.org:8443/x?y#z", "cdn.example.org:8443"),
        ("http://h.example?q=1", "h.example"),
        ("not a url", "not a url"),
    ],
)
def test_host_of(url, host):
    assert host_of(url) == host


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def urls(n: int, hosts: int) -> list[str]:
    return [f"http://h{i % hosts}.example/{i}.jpg" for i in range(n)]


def test_row_order_while_nothing_is_known_and_every_row_once():
    order = FeedOrder(urls(1000, 10), max_lead=300, clock=Clock())
    got = []
    while len(order):
        got += order.take(37)
    assert got == list(range(1000))
    assert order.take(5) == []


def slow_host_3(clock: Clock, n: int = 2000, max_lead: int = 120) -> tuple[FeedOrder, list[int]]:
    """100 rows requested in the first second: host 3's take 2 s, the others' 1 s."""
    order = FeedOrder(urls(n, 10), max_lead=max_lead, clock=clock)
    first = order.take(100)
    clock.now = 1.0
    for i in first:
        if i % 10 != 3:
            order.finished(i)
    clock.now = 2.0
    for i in first:
        if i % 10 == 3:
            order.finished(i)
    return order, first


def test_a_slow_hosts_rows_come_early_by_its_time_and_at_most_max_lead():
    clock = Clock()
    order, first = slow_host_3(clock)
    nxt = order.take(100)
    # 100 rows in 2 s: 50 rows/s; host 3 is 2 s x LEAD_FACTOR 2 x 50/s = 200 rows early, capped at 120
    early = [i for i in nxt if i % 10 == 3 and i >= 200]
    assert early[0] == 203 and max(early) <= 100 + len(nxt) + 120
    others = [i for i in nxt if i % 10 != 3]
    assert others == sorted(others) and others[0] == 100  # the quick hosts: row order
    rest = []
    while len(order):
        rest += order.take(50)
    assert sorted(first + nxt + rest) == list(range(2000))


def test_a_host_that_speeds_up_goes_back_to_row_order():
    clock = Clock()
    order, _ = slow_host_3(clock)
    nxt = order.take(100)
    for i in nxt:
        if i % 10 == 3:
            order.finished(i)  # at once: its average falls under SLOW_S
    later = order.take(300)
    # the one row already scheduled while it was slow may still come early; the rest in row order
    host_3 = [i for i in later if i % 10 == 3][1:]
    others = [i for i in later if i % 10 != 3]
    assert len(host_3) > 10 and host_3 == [i for i in range(host_3[0], others[-1] + 1) if i % 10 == 3]


def test_random_finishes_keep_every_row_exactly_once():
    rng = random.Random(0)
    clock = Clock()
    order = FeedOrder(urls(3000, 37), max_lead=500, clock=clock)
    out, pending = [], []
    while len(order):
        batch = order.take(rng.randint(1, 64))
        out += batch
        pending += batch
        rng.shuffle(pending)
        for _ in range(rng.randint(0, len(pending))):
            clock.now += rng.random() / 50
            order.finished(pending.pop())
    assert sorted(out) == list(range(3000))
