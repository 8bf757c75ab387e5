"""run_in_order: results in input order from a thread pool; failures raised; early close stops work."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.in_order import run_in_order


@pytest.mark.parametrize("rows", [0, 1, 7, 8, 9, 100])
def test_results_come_in_input_order_whatever_order_they_finish_in(rows):
    rng = random.Random(rows)
    delays = [rng.random() / 500 for _ in range(rows)]

    def slow_square(i, delay):
        time.sleep(delay)
        return i * i

    with ThreadPoolExecutor(6) as pool:
        out = list(run_in_order(pool, 6, slow_square, [(i, delays[i]) for i in range(rows)], chunk=8))
    assert out == [i * i for i in range(rows)]


def test_a_chunk_is_yielded_once_its_rows_are_done_not_after_the_whole_input():
    release = threading.Event()

    def row(i):
        if i >= 4:  # the second chunk waits until the first one was consumed
            assert release.wait(5), "the first chunk was not yielded while later rows were still running"
        return i

    with ThreadPoolExecutor(4) as pool:
        results = run_in_order(pool, 4, row, [(i,) for i in range(8)], chunk=4)
        first = [next(results) for _ in range(4)]
        release.set()
        rest = list(results)
    assert first + rest == list(range(8))


def test_a_failure_in_a_row_is_raised_in_the_consumer_and_stops_the_other_tasks():
    started = []

    def row(i):
        started.append(i)
        if i == 3:
            raise KeyboardInterrupt("row 3")
        time.sleep(0.001)
        return i

    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(KeyboardInterrupt, match="row 3"):
            list(run_in_order(pool, 2, row, [(i,) for i in range(1000)], chunk=4))
    assert len(started) < 1000  # the rows after the failure were never started


def test_closing_the_consumer_early_stops_claiming_rows():
    started = []

    def row(i):
        started.append(i)
        time.sleep(0.001)
        return i

    with ThreadPoolExecutor(3) as pool:
        results = run_in_order(pool, 3, row, [(i,) for i in range(1000)], chunk=4)
        assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
        results.close()
    assert len(started) < 100  # the pool's shutdown waited for the running rows only


def test_two_consumers_can_share_one_pool():
    """An actor runs two shards at once on its one pool: both finish, each in its own order."""
    with ThreadPoolExecutor(4) as pool:
        a = run_in_order(pool, 4, lambda i: ("a", i), [(i,) for i in range(50)], chunk=8)
        b = run_in_order(pool, 4, lambda i: ("b", i), [(i,) for i in range(50)], chunk=8)
        got_a, got_b = [], []
        for x, y in zip(a, b):
            got_a.append(x)
            got_b.append(y)
    assert got_a == [("a", i) for i in range(50)] and got_b == [("b", i) for i in range(50)]
