"""Exact dedup: a row is a duplicate when a row with a smaller key has the same image (sha256 of
the stored bytes) or the same (url, caption) pair. The first row by key order is kept, so the
result does not depend on which worker finished first.

The (url, caption) dedup needs only the input, so it is decided before the download (a repeated
row is never fetched): `pair_index` lists the rows that would be downloaded (the rule of
`eligibility.py`, which the download applies too), with their pair digest; the image dedup runs
after the download on the shards' index files.

Plain functions over `pyarrow.Table`s; `run.py` applies them per hash bucket on Ray Data so the
whole run's keys never need to fit in one process.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.eligibility import table_rejections
from pipeline.filters import RowFilters

# The committed decisions of the (url, caption) dedup: the duplicate rows (key, first_key, by),
# then the marker that commits them (written last). Both are made before any download starts.
PAIR_DUPLICATES = "_state/pairs/duplicates.parquet"
PAIR_DECISIONS = "_state/pairs/decisions.json"


def pair_digests(urls: list, captions: list) -> pa.Array:
    """128-bit hex digests of (url, caption) pairs (a separator no URL contains keeps them apart)."""
    out = []
    for url, caption in zip(urls, captions):
        h = hashlib.blake2b(digest_size=16)
        h.update((url or "").encode("utf-8", "surrogatepass"))
        h.update(b"\x00\x1f")
        h.update((caption or "").encode("utf-8", "surrogatepass"))
        out.append(h.hexdigest())
    return pa.array(out, type=pa.string())


def pair_index(table: pa.Table, keys: list[str], filters: RowFilters) -> pa.Table:
    """`key`, `pair` of the staged input rows that would be downloaded (`eligibility.py`: readable,
    a caption `filters` accept, a non-empty URL). The other rows are rejected for their own reason
    by the download, so they never become, or make, duplicates."""
    urls = table.column("url").to_pylist()
    # Rows without a URL (WebDataset input brings its images) have no (url, caption) pair to repeat.
    rows = [i for i, rejection in enumerate(table_rejections(table, filters)) if rejection is None and urls[i]]
    captions = table.column("caption").to_pylist()
    return pa.table(
        {
            "key": pa.array([keys[i] for i in rows], pa.string()),
            "pair": pair_digests([urls[i] for i in rows], [captions[i] for i in rows]),
        }
    )


def later_duplicates(table: pa.Table, digest_col: str) -> pa.Table:
    """Rows of `table` (columns `key`, `digest_col`) whose digest appeared with a smaller key.

    Returns columns `key` (the duplicate) and `first_key` (the row it duplicates).
    """
    if table.num_rows == 0:
        return pa.table({"key": pa.array([], pa.string()), "first_key": pa.array([], pa.string())})
    ordered = table.select(["key", digest_col]).sort_by([(digest_col, "ascending"), ("key", "ascending")])
    digests = ordered.column(digest_col).combine_chunks()
    keys = ordered.column("key").combine_chunks()
    same_as_previous = np.zeros(len(keys), dtype=bool)
    if len(keys) > 1:
        same_as_previous[1:] = pc.equal(digests[1:], digests[:-1]).to_numpy(zero_copy_only=False)
    # index of the first row of each run of equal digests
    starts = np.where(same_as_previous, 0, np.arange(len(keys)))
    first = np.maximum.accumulate(starts)
    dup = np.nonzero(same_as_previous)[0]
    return pa.table({"key": keys.take(pa.array(dup)), "first_key": keys.take(pa.array(first[dup]))})


def bucket_prefix_length(rows: int) -> int:
    """Hex digits of the digest that choose a dedup bucket: about a million rows per bucket."""
    length = 1
    while 16**length * 1_000_000 < rows and length < 4:
        length += 1
    return length


def with_bucket(table: pa.Table, digest_col: str, prefix: int) -> pa.Table:
    return table.append_column("bucket", pc.utf8_slice_codeunits(table.column(digest_col), 0, prefix))
