"""A pass over the shards as one global sequence, dealt to any number of workers (pure, no Ray).

Pass p of the run (docs/training.md "Training length and passes", "Resuming on another number of
workers"):
- its shards (`mixture.mix_pass`: the weighted sources' shards of pass p) are ordered by a
  permutation seeded with (train.seed, p) and their row groups cut into **windows** of at least
  `train.shuffle_rows` rows (whole row groups); a window's rows are read in the order of a
  permutation seeded with (train.seed, p, the window's first row in the pass). The windows and their
  orders are a function of (shards, weights, seed, pass, shuffle_rows), not of the cluster.
- The windows are **dealt** to the workers in order, each to the worker with the fewest rows so far
  (ties rotate with the pass). A worker's stream of the pass is its windows, one after another; a
  worker whose share ends first goes on with its share of the next pass (with fewer windows than
  workers, a worker may have no share of a pass: the rotation gives it one in a later pass).
- What has been trained on is a `PassState`: {window index: rows consumed}, each a prefix of the
  window's order. It does not depend on the world size. A worker's position (rows of its stream
  consumed) converts to it (`consumed`), and `deal` gives any number of workers the rest of the
  pass: the remaining windows, a partly consumed one from its next row. So a run that changes size
  resumes with no row of the pass skipped or read twice; a run that keeps its size keeps its deal
  (the same streams, bit for bit).

Why windows are dealt, and not every global batch cut across the workers row by row: a worker then
reads only its own windows (a window's row groups are read once), where cutting each batch across
W workers would make each of them read every window's row groups for 1/W of their rows.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

from training.ingest.mixture import mix_pass
from training.ingest.plan import Shard

PassState = dict  # {window index: rows of its order consumed}; absent = 0


@dataclass(frozen=True)
class Window:
    index: int  # in the pass's sequence of windows
    first: int  # its first row in the pass (the key of its permutation)
    pieces: tuple  # ((path, row group, rows), ...)
    rows: int


def cut_windows(files: Sequence[Shard], window_rows: int) -> list[Window]:
    """`files`' row groups in order, cut into windows of at least `window_rows` rows (0: one window
    per row group)."""
    windows: list[Window] = []
    pieces: list = []
    first = offset = 0
    for shard in files:
        for group, rows in enumerate(shard.groups):
            if not pieces:
                first = offset
            pieces.append((shard.path, group, rows))
            offset += rows
            if offset - first >= max(1, window_rows):
                windows.append(Window(len(windows), first, tuple(pieces), offset - first))
                pieces = []
    if pieces:
        windows.append(Window(len(windows), first, tuple(pieces), offset - first))
    return windows


def pass_windows(shards: Sequence[Shard], seed: int, pass_index: int, shuffle_rows: int) -> list[Window]:
    """The windows of a pass over `shards` (already the pass's shards: `mix_pass`)."""
    order = np.random.default_rng([seed, pass_index]).permutation(len(shards))
    return cut_windows([shards[int(i)] for i in order], max(0, shuffle_rows))


def deal(windows: Sequence[Window], state: PassState, num_workers: int, pass_index: int) -> list[list[tuple]]:
    """Each worker's share of what is left of a pass: [(window, first row of its order to read), ...]
    in reading order. Deterministic in (windows, state, num_workers, pass)."""
    heap = [(0, (w - pass_index) % num_workers, w) for w in range(num_workers)]
    heapq.heapify(heap)
    shares: list[list[tuple]] = [[] for _ in range(num_workers)]
    for window in windows:
        start = int(state.get(window.index, 0))
        if start >= window.rows:
            continue
        rows, tie, worker = heapq.heappop(heap)
        shares[worker].append((window, start))
        heapq.heappush(heap, (rows + window.rows - start, tie, worker))
    return shares


def share_units(
    share: Sequence[tuple],
    pass_index: int,
    start_row: int = 0,
    stop_row: Optional[int] = None,
    *,
    shuffle: bool,
    seed: int,
) -> list[dict]:
    """Read units of rows [start_row, stop_row) of a worker's stream (its share, windows one after
    another). A unit: {"pieces": JSON [[path, group, rows], ...], "pass", "perm" (the permutation key:
    the window's first row in the pass), "skip" / "take" (rows of the window's order to pass over,
    then to read), "row" (stream index of the first row read), "shuffle", "seed"}."""
    units = []
    offset = 0
    for window, start in share:
        rows = window.rows - start
        lo = max(start_row, offset)
        hi = offset + rows if stop_row is None else min(stop_row, offset + rows)
        if hi > lo:
            units.append(
                {
                    "pieces": json.dumps([list(p) for p in window.pieces]),
                    "pass": pass_index,
                    "perm": window.first,
                    "skip": start + lo - offset,
                    "take": hi - lo,
                    "row": lo,
                    "shuffle": shuffle,
                    "seed": seed,
                }
            )
        offset += rows
    return units


def pass_units(
    files: Sequence[Shard],
    pass_index: int,
    start_row: int = 0,
    stop_row: Optional[int] = None,
    *,
    window_rows: int = 0,
    seed: int = 0,
) -> list[dict]:
    """Read units of rows [start_row, stop_row) of `files` read in the order given, in windows of at
    least `window_rows` rows (0: row groups in file order, unshuffled)."""
    share = [(w, 0) for w in cut_windows(files, window_rows)]
    return share_units(share, pass_index, start_row, stop_row, shuffle=window_rows > 0, seed=seed)


def consumed(share: Sequence[tuple], rows: int, state: PassState) -> PassState:
    """`state` plus the first `rows` rows of a worker's `share`."""
    out = dict(state)
    _consume(share, rows, out)
    return out


def _consume(share: Sequence[tuple], rows: int, state: PassState) -> None:
    for window, start in share:
        if rows <= 0:
            break
        take = min(rows, window.rows - start)
        state[window.index] = start + take
        rows -= take


def encode_state(state: PassState, windows: Sequence[Window]) -> dict:
    """A compact JSON form: ranges of finished windows and the partly consumed ones."""
    done, partial = [], []
    for window in windows:
        n = int(state.get(window.index, 0))
        if n >= window.rows:
            if done and done[-1][1] == window.index:
                done[-1][1] = window.index + 1
            else:
                done.append([window.index, window.index + 1])
        elif n > 0:
            partial.append([window.index, n])
    return {"done": done, "partial": partial}


def decode_state(encoded: dict, windows: Sequence[Window]) -> PassState:
    state = {}
    for lo, hi in encoded.get("done", []):
        for i in range(int(lo), int(hi)):
            state[i] = windows[i].rows
    for i, n in encoded.get("partial", []):
        state[int(i)] = int(n)
    return state


class PassPlanner:
    """The passes of a run for a group of `num_workers`: windows, deals, units, positions.

    `bases` holds, for passes a resized run had begun, what had been consumed when it resized; a
    pass without one is dealt whole.
    """

    def __init__(
        self,
        shards: Sequence[Shard],
        *,
        seed: int,
        shuffle_rows: int,
        num_workers: int,
        weights: Sequence[float] = (),
        bases: Optional[dict[int, PassState]] = None,
    ):
        self.shards, self.seed, self.shuffle_rows = tuple(shards), seed, shuffle_rows
        self.num_workers, self.weights = num_workers, tuple(weights)
        self.bases = dict(bases or {})
        self._windows = lru_cache(maxsize=4)(self._cut)
        self._shares = lru_cache(maxsize=4)(self._deal)

    def _cut(self, pass_index: int) -> list[Window]:
        shards = mix_pass(self.shards, self.weights, self.seed, pass_index)
        return pass_windows(shards, self.seed, pass_index, self.shuffle_rows)

    def _deal(self, pass_index: int) -> list[list[tuple]]:
        return deal(self.windows(pass_index), self.bases.get(pass_index, {}), self.num_workers, pass_index)

    def windows(self, pass_index: int) -> list[Window]:
        return self._windows(pass_index)

    def share(self, pass_index: int, rank: int) -> list[tuple]:
        return self._shares(pass_index)[rank]

    def units(self, pass_index: int, rank: int, start_row: int = 0) -> list[dict]:
        return share_units(
            self.share(pass_index, rank), pass_index, start_row, shuffle=self.shuffle_rows > 0, seed=self.seed
        )

    def state(self, pass_index: int, positions: Sequence[tuple[int, int]]) -> PassState:
        """What of pass `pass_index` the workers at `positions` [(pass, rows), ...] have consumed."""
        state = dict(self.bases.get(pass_index, {}))
        for rank, (worker_pass, rows) in enumerate(positions):
            if worker_pass < pass_index:
                continue
            _consume(self.share(pass_index, rank), rows if worker_pass == pass_index else 1 << 62, state)
        return state

    def remaining(self, pass_index: int, state: PassState) -> int:
        return sum(max(0, w.rows - int(state.get(w.index, 0))) for w in self.windows(pass_index))

    def encode(self, bases: dict[int, PassState]) -> dict[str, dict]:
        return {str(p): encode_state(s, self.windows(p)) for p, s in sorted(bases.items())}

    def decode(self, encoded: dict[str, dict]) -> dict[int, PassState]:
        return {int(p): decode_state(s, self.windows(int(p))) for p, s in encoded.items()}


def resize(
    old: PassPlanner, positions: Sequence[tuple[int, int]], num_workers: int
) -> tuple[tuple[int, int], dict[int, PassState]]:
    """A group of `old.num_workers` workers stopped at `positions` [(pass, rows), ...]; a group of
    `num_workers` goes on. Returns (the new workers' common start (pass, 0), the new bases): every
    pass some worker had begun gets as basis what all of them consumed of it; the new group starts at
    the first of those passes with rows left."""
    first, last = min(p for p, _ in positions), max(p for p, _ in positions)
    bases: dict[int, PassState] = {}
    start = last + 1
    for q in range(first, last + 1):
        state = old.state(q, positions)
        if old.remaining(q, state) > 0:
            bases[q] = state
            start = min(start, q)
    return (start, 0), bases  # every pass with a basis has rows left, so none is before `start`


def split_rows(shards: Sequence[Shard], rank: int, world_size: int) -> list[dict]:
    """Read units of worker `rank`'s contiguous share of all rows of `shards`, in file order, not
    shuffled (evaluation: every row once over all workers)."""
    total = sum(s.rows for s in shards)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    return pass_units(shards, 0, lo, hi)
