"""Planning a pass over the shards (pure, no Ray): which shard files, in which order, for which
worker, cut into read units.

`list_shards` finds the shard files of `train.data` (Parquet, or WebDataset tars: a tar's "row
groups" are its read pieces of `TAR_PIECE_SAMPLES` samples, `training.ingest.webdataset`) and reads
their footers (rows, row groups).
`plan_pass` orders the files of pass p by a permutation seeded with (train.seed, p) and deals them
to the workers, rows balanced. `pass_units` cuts a worker's pass into read units (row groups,
grouped into shuffle windows of `train.shuffle_rows` rows whose rows are permuted by a seeded
generator), from any row on, so its stream is a pure function of (shards, seed, pass, worker) and
a resumed run starts at the exact row. `split_rows` gives each worker a contiguous share of an
evaluation set.

Why read units and not `read_parquet(files)`: a worker reads the same file again in a later pass
and `read_parquet` drops repeated paths, so a multi-pass stream would need one Dataset (one
executor and actor pool start) per pass, which costs seconds per pass and dominates small runs;
units also let a resumed run start at the exact row without decoding what it skips, and carry the
pass into the crop seed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import heapq
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from storage import StorageConfig, absolute, is_local, protocol_of, pyarrow_filesystem
from storage.webdataset import TAR_SUFFIX, expand_braces, is_tar
from training.ingest.preprocess import REQUIRED_COLUMNS
from training.ingest.webdataset import default_count_cache, tar_counts


# ---------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    path: str  # in the filesystem's own form (no scheme for pyarrow filesystems)
    rows: int
    row_groups: tuple[int, ...] = ()  # rows per row group; () = one group of `rows`
    source: int = 0  # index of its weighted source in train.data (mixture.py); 0 for plain paths

    @property
    def groups(self) -> tuple[int, ...]:
        return self.row_groups or (self.rows,)


def list_shards(
    locations: Sequence[str],
    storage: Optional[StorageConfig] = None,
    *,
    what: str = "train.data",
    threads: int = 32,
    count_cache: Optional[str] = None,
) -> tuple[Any, list[Shard]]:
    """Find the shards under `locations` (folders, files, globs or `{000..099}` brace ranges; local
    or remote URIs) and read their footers: Parquet files, or WebDataset `.tar` shards (a folder
    with tars is read as WebDataset: img2dataset's `.parquet` files beside them are metadata).
    Tar sample counts and offsets are cached under `count_cache` (default `default_count_cache()`).

    Returns (pyarrow filesystem, non-empty shards sorted by path). Raises FileNotFoundError for a
    missing location and ValueError naming the location without shards or the shard without a column.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if not locations:
        raise ValueError(f"{what} is empty: give one or more shard folders (a pipeline's {{output}}/shards)")
    fs = None
    paths: list[str] = []
    for location in [name for pattern in locations for name in expand_braces(pattern)]:
        if fs is None:
            fs, path = pyarrow_filesystem(location, storage)
            protocol = protocol_of(location)
        elif protocol_of(location) != protocol:
            raise ValueError(f"{what}: all locations must be on one filesystem; {location} is not on {protocol}")
        else:  # the same filesystem: only the path differs
            path = absolute(location) if is_local(location) else absolute(location).split("://", 1)[1]
        if any(c in path for c in "*?["):
            cut = min(path.find(c) for c in "*?[" if c in path)
            parent = path[:cut].rsplit("/", 1)[0] or "/"
            infos = fs.get_file_info(pafs.FileSelector(parent, recursive=True, allow_not_found=True))
            found = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{what}: {location} does not exist")
            if info.type == pafs.FileType.File:
                found = [path]
            else:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                found = [
                    i.path
                    for i in infos
                    if i.type == pafs.FileType.File
                    and i.path.endswith((".parquet", TAR_SUFFIX))
                    and not os.path.basename(i.path).startswith((".", "_"))
                ]
                tars = [p for p in found if is_tar(p)]
                found = tars or found
        if not found:
            raise ValueError(f"{what}: {location} holds no .parquet or .tar shard")
        paths.extend(found)
    paths = sorted(set(paths))
    tar_paths = [p for p in paths if is_tar(p)]
    counts = tar_counts(
        fs, tar_paths, cache=count_cache if count_cache is not None else default_count_cache(), what=what
    )

    def footer(path: str) -> Shard:
        if is_tar(path):
            samples, pieces = counts[path]
            return Shard(path, samples, pieces)
        try:
            meta = pq.read_metadata(path, filesystem=fs)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{what}: {path} is not a readable Parquet file ({exc})") from None
        names = set(meta.schema.names)
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(
                f"{what}: shard {path} lacks column(s) {', '.join(missing)} "
                f"(has: {', '.join(sorted(names))}); training reads the pipeline's "
                f"shard layout: {', '.join(REQUIRED_COLUMNS)}"
            )
        groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        return Shard(path, meta.num_rows, groups)

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        shards = list(pool.map(footer, paths))
    if sum(s.rows for s in shards) == 0:
        raise ValueError(f"{what}: the {len(shards)} shard(s) under {', '.join(locations)} hold no rows")
    return fs, [s for s in shards if s.rows > 0]


def plan_pass(shards: Sequence[Shard], num_workers: int, seed: int, pass_index: int) -> list[list[Shard]]:
    """Each worker's files of pass `pass_index`, in reading order.

    The files are permuted with a generator seeded by (seed, pass_index), then dealt one by one to
    the worker with the fewest rows so far (ties rotate with the pass, so with fewer files than
    workers every worker gets data in turn). Deterministic: a resumed run recomputes the same plan.
    """
    order = np.random.default_rng([seed, pass_index]).permutation(len(shards))
    heap = [(0, (w - pass_index) % num_workers, w) for w in range(num_workers)]
    heapq.heapify(heap)
    plan: list[list[Shard]] = [[] for _ in range(num_workers)]
    for i in order:
        rows, tie, worker = heapq.heappop(heap)
        plan[worker].append(shards[int(i)])
        heapq.heappush(heap, (rows + shards[int(i)].rows, tie, worker))
    return plan


def plan_fingerprint(shards: Sequence[Shard], num_workers: int, seed: int, weights: Sequence[float] = ()) -> str:
    """Identifies the plan a data position refers to (files, row counts, workers, seed, source weights)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{num_workers}/{seed}".encode())
    for s in shards:
        h.update(f"\0{s.path}\0{s.rows}".encode() + (f"\0{s.source}".encode() if weights else b""))
    if weights:
        h.update(("\0weights:" + ",".join(repr(float(w)) for w in weights)).encode())
    return h.hexdigest()


def pass_units(
    files: Sequence[Shard],
    pass_index: int,
    start_row: int = 0,
    stop_row: Optional[int] = None,
    *,
    window_rows: int = 0,
    seed: int = 0,
) -> list[dict]:
    """Read units covering rows [start_row, stop_row) of a worker's pass stream.

    The stream is the row groups of `files` in order, cut into windows of at least `window_rows`
    rows (whole row groups; 0 = one window per row group); with `window_rows` > 0 the rows of each
    window are permuted by a generator seeded with (seed, pass, window start), so a batch mixes
    rows from several row groups and files, and the order is still a pure function of the plan.
    A unit: {"pieces": JSON [[path, group, rows], ...], "pass", "row" (stream index of the
    window's first row), "skip" / "take" (rows of the window's order to drop, then keep),
    "shuffle", "seed"}.
    """
    import json

    windows: list[tuple[list, int]] = []  # (pieces, first row)
    pieces: list = []
    first, offset = 0, 0
    for shard in files:
        for group, rows in enumerate(shard.groups):
            if not pieces:
                first = offset
            pieces.append([shard.path, group, rows])
            offset += rows
            if offset - first >= max(1, window_rows):
                windows.append((pieces, first))
                pieces = []
    if pieces:
        windows.append((pieces, first))
    units = []
    for pieces, first in windows:
        end = first + sum(p[2] for p in pieces)
        lo, hi = max(start_row, first), end if stop_row is None else min(stop_row, end)
        if hi > lo:
            units.append(
                {
                    "pieces": json.dumps(pieces),
                    "pass": pass_index,
                    "row": first,
                    "skip": lo - first,
                    "take": hi - lo,
                    "shuffle": window_rows > 0,
                    "seed": seed,
                }
            )
    return units


def split_rows(shards: Sequence[Shard], rank: int, world_size: int) -> list[dict]:
    """Read units of worker `rank`'s contiguous share of all rows of `shards`, in file order, not
    shuffled (evaluation: every row once over all workers)."""
    total = sum(s.rows for s in shards)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    return pass_units(shards, 0, lo, hi)
