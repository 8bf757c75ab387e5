"""InOrder: results put in any order by any thread come out in row order; a failure is raised in
the consumer; closing drops later results; the consumer wakes per chunk, not per row."""

from __future__ import annotations

import random
import threading
import time

import pytest

from pipeline.in_order import InOrder


@pytest.mark.parametrize("rows", [0, 1, 7, 8, 9, 100])
def test_results_come_in_input_order_whatever_order_they_finish_in(rows):
    results: InOrder[int] = InOrder(rows, chunk=8)
    order = list(range(rows))
    random.Random(rows).shuffle(order)

    def producer(part):
        for i in part:
            time.sleep(random.random() / 2000)
            results.put(i, i * i)

    threads = [threading.Thread(target=producer, args=(order[k::3],)) for k in range(3)]
    for t in threads:
        t.start()
    out = list(results)
    for t in threads:
        t.join()
    assert out == [i * i for i in range(rows)]


def test_a_chunk_is_yielded_once_its_rows_are_done_not_after_the_whole_input():
    results: InOrder[int] = InOrder(8, chunk=4)
    for i in range(4):
        results.put(i, i)
    it = iter(results)
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]  # rows 4-7 not done yet: no wait for them
    got = []
    consumer = threading.Thread(target=lambda: got.extend(it))
    consumer.start()
    for i in (7, 5, 6):
        results.put(i, i)
    time.sleep(0.05)
    assert got == []  # row 4 is missing: the chunk is not handed out
    results.put(4, 4)
    consumer.join(5)
    assert got == [4, 5, 6, 7]


def test_the_consumer_wakes_once_per_chunk_not_once_per_row():
    results: InOrder[int] = InOrder(64, chunk=32)
    wakeups = []
    real_wait = results._changed.wait

    def counting_wait(*args):
        wakeups.append(1)
        return real_wait(*args)

    results._changed.wait = counting_wait
    out = []
    consumer = threading.Thread(target=lambda: out.extend(results))
    consumer.start()
    time.sleep(0.05)  # the consumer waits on the first chunk
    for i in range(64):
        results.put(i, i)
    consumer.join(5)
    assert out == list(range(64))
    assert len(wakeups) <= 2


def test_a_failure_in_a_producer_is_raised_in_the_consumer():
    results: InOrder[int] = InOrder(10, chunk=4)
    for i in range(4):
        results.put(i, i)
    it = iter(results)
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
    results.fail(KeyboardInterrupt("row 5"))
    with pytest.raises(KeyboardInterrupt, match="row 5"):
        next(it)
    assert results.closed


def test_closing_the_consumer_drops_later_results_and_tells_producers():
    results: InOrder[bytes] = InOrder(100, chunk=4)
    for i in range(4):
        results.put(i, b"x")
    it = iter(results)
    next(it)
    it.close()  # an abandoned shard
    assert results.closed
    results.put(50, b"late")  # a row that was in flight when the shard was abandoned
    assert results._results[50] is None


def test_permits_are_taken_in_batches_and_a_claim_gets_the_next_one_given_back():
    from pipeline.in_order import Permits

    handed = []
    permits = Permits(8, batch=4, on_handoff=lambda: handed.append(1))
    assert permits.take(100) == 8  # everything free: all of it
    assert not permits.try_take()  # none free: the network thread files a claim, without waiting
    got = []
    taker = threading.Thread(target=lambda: got.append(permits.take(100)))
    taker.start()
    permits.give()  # goes to the claim, not to the feeder
    assert handed == [1] and permits.free == 0
    for _ in range(3):
        permits.give()
    time.sleep(0.05)
    assert got == []  # 3 free: fewer than a batch, the feeder sleeps on
    assert permits.try_take()  # a free one is taken at once
    permits.give(2)
    taker.join(5)
    assert got == [4]
    assert permits.free == 0  # never below zero: at most 8 held
