"""The shards of `train.data` (pure, no Ray): `list_shards` finds the shard files (Parquet, or
WebDataset tars: a tar's "row groups" are its read pieces of `TAR_PIECE_SAMPLES` samples,
`training.ingest.webdataset`) and reads their footers (rows, row groups); `plan_fingerprint`
identifies them for a data position. How a pass over them is ordered and dealt to the workers is
`passes.py`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

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


def plan_fingerprint(shards: Sequence[Shard], seed: int, weights: Sequence[float] = (), shuffle_rows: int = 0) -> str:
    """Identifies the passes a data position refers to (files, row counts, seed, source weights,
    shuffle windows); not the number of workers: any number resumes a position (`passes.py`)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{seed}/{shuffle_rows}".encode())
    for s in shards:
        h.update(f"\0{s.path}\0{s.rows}\0{s.groups}".encode() + (f"\0{s.source}".encode() if weights else b""))
    if weights:
        h.update(("\0weights:" + ",".join(repr(float(w)) for w in weights)).encode())
    return h.hexdigest()
