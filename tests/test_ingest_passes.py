"""A pass as one sequence of shuffle windows dealt to any number of workers (training/ingest/passes.py):
every row of a pass once, the same deal for the same inputs, and a group that changes size mid-pass
(4 -> 2, 2 -> 4, 3 -> 5 -> 1, ...) reads exactly the rows the first group left, none twice.

Rows are named (window index, place in the window's order): what `ShardReader` reads for a unit is
rows [skip, skip + take) of the window's order, so these tests check the plan at the row level
without reading files (tests/test_ingest.py reads them).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from training.ingest import PassPlanner, Shard, pass_windows, resize
from training.ingest.passes import consumed, deal, decode_state, encode_state


def _shards(n: int = 12, seed: int = 0) -> list[Shard]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        groups = tuple(int(g) for g in rng.integers(5, 40, size=int(rng.integers(1, 4))))
        out.append(Shard(f"s{i:02d}.parquet", sum(groups), groups))
    return out


def _planner(shards, workers, bases=None, shuffle_rows=50, weights=()):
    return PassPlanner(shards, seed=7, shuffle_rows=shuffle_rows, num_workers=workers, weights=weights, bases=bases)


def _rows(units) -> list[tuple[int, int]]:
    """The rows the units read: (permutation key = the window's first row, place in its order)."""
    return [(u["perm"], i) for u in units for i in range(u["skip"], u["skip"] + u["take"])]


def test_windows_cover_the_pass_once_in_whole_row_groups_and_change_with_the_pass():
    shards = _shards()
    total = sum(s.rows for s in shards)
    w0 = pass_windows(shards, 7, 0, 50)
    assert sum(w.rows for w in w0) == total
    assert all(w.rows >= 50 for w in w0[:-1])  # at least shuffle_rows, whole row groups
    assert Counter((p[0], p[1]) for w in w0 for p in w.pieces) == Counter(
        (s.path, g) for s in shards for g in range(len(s.groups))
    )
    assert [w.first for w in w0] == list(np.cumsum([0] + [w.rows for w in w0[:-1]]))
    assert w0 == pass_windows(shards, 7, 0, 50)  # a function of its inputs
    assert [w.pieces for w in w0] != [w.pieces for w in pass_windows(shards, 7, 1, 50)]  # reshuffled per pass
    assert all(len(w.pieces) == 1 for w in pass_windows(shards, 7, 0, 0))  # no shuffle: one row group each


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 7])
def test_the_deal_gives_every_row_of_a_pass_to_one_worker_rows_balanced(workers):
    shards = _shards()
    planner = _planner(shards, workers)
    units = [planner.units(3, rank) for rank in range(workers)]
    seen = Counter(r for share in units for r in _rows(share))
    windows = planner.windows(3)
    assert seen == Counter((w.first, i) for w in windows for i in range(w.rows))
    loads = [sum(u["take"] for u in share) for share in units]
    assert max(loads) - min(loads) <= max(w.rows for w in windows)
    # Stream indices run 0.. without gaps on every worker: the data position is rows of the share.
    for share in units:
        assert [u["row"] for u in share] == list(np.cumsum([0] + [u["take"] for u in share[:-1]]))


def test_a_lone_window_goes_to_each_worker_in_turn():
    owners = [next(rank for rank in range(2) if _planner([Shard("only", 10)], 2).units(p, rank)) for p in range(4)]
    assert owners == [0, 1, 0, 1]


def _positions(planner: PassPlanner, pass_index: int, rng) -> list[tuple[int, int]]:
    """Random positions of every worker within pass `pass_index` (some may be done with it)."""
    out = []
    for rank in range(planner.num_workers):
        rows = sum(u["take"] for u in planner.units(pass_index, rank))
        if rng.random() < 0.2:  # this worker has finished its share and begun the next pass
            out.append(
                (pass_index + 1, int(rng.integers(0, 1 + sum(u["take"] for u in planner.units(pass_index + 1, rank)))))
            )
        else:
            out.append((pass_index, int(rng.integers(0, rows + 1))))
    return out


def _read(planner: PassPlanner, start, positions) -> Counter:
    """Rows the workers of `planner`, started at `start`, read up to `positions`: (pass, key, place)."""
    out: Counter = Counter()
    for rank, (at_pass, rows) in enumerate(positions):
        for q in range(start[0], at_pass + 1):
            units = _rows(planner.units(q, rank, start[1] if q == start[0] else 0))
            out.update((q, *r) for r in (units[:rows] if q == at_pass else units))
    return out


@pytest.mark.parametrize("chain", [(4, 2), (2, 4), (3, 5, 1), (2, 2), (1, 6, 3), (5, 4, 4, 2)])
def test_a_resized_group_reads_exactly_what_the_last_one_left(chain):
    """Workers stop at random places (some already in the next pass), a group of another size goes
    on from the checkpoint, maybe several times; then the last group reads passes 2 and 3 to their
    end: every row of them is read exactly once."""
    shards = _shards()
    rng = np.random.default_rng(len(chain) * 100 + chain[0])
    planner, start = _planner(shards, chain[0]), (2, 0)
    seen: Counter = Counter()
    for workers in chain[1:]:
        positions = _positions(planner, start[0], rng)
        seen += _read(planner, start, positions)
        start, bases = resize(planner, positions, workers)
        bases = planner.decode(planner.encode(bases))  # through the checkpoint's JSON form
        planner = _planner(shards, workers, bases)
    ends = [
        (3, sum(u["take"] for u in planner.units(3, rank, start[1] if start[0] == 3 else 0)))
        for rank in range(planner.num_workers)
    ]
    seen += _read(planner, start, ends)
    expected = Counter((q, w.first, i) for q in (2, 3) for w in planner.windows(q) for i in range(w.rows))
    assert Counter({k: n for k, n in seen.items() if k[0] in (2, 3)}) == expected


def test_a_resize_with_the_pass_done_starts_the_next_pass_without_a_basis():
    shards = _shards()
    planner = _planner(shards, 2)
    ends = [(1, sum(u["take"] for u in planner.units(1, r))) for r in range(2)]
    assert resize(planner, ends, 3) == ((2, 0), {})


def test_state_encoding_round_trips_and_stays_small():
    shards = _shards(40)
    windows = pass_windows(shards, 1, 0, 20)
    share = deal(windows, {}, 1, 0)[0]
    state = consumed(share, sum(w.rows for w in windows[:30]) + 3, {})
    encoded = encode_state(state, windows)
    assert encoded == {"done": [[0, 30]], "partial": [[30, 3]]}
    assert decode_state(encoded, windows) == state


def test_weighted_sources_are_dealt_the_same_way():
    shards = [Shard(f"a{i}", 30, (30,), 0) for i in range(4)] + [Shard(f"b{i}", 30, (30,), 1) for i in range(4)]
    planner = _planner(shards, 3, weights=(3.0, 1.0))
    rows = [r for rank in range(3) for r in _rows(planner.units(0, rank))]
    assert len(rows) == len(set(rows)) == sum(w.rows for w in planner.windows(0))
