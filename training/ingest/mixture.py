"""Weighted source mixing (`train.data: [{path, weight}, ...]`; pure, no Ray).

Every pass holds about as many rows as all sources together (`N`), of which source `i` supplies
`N * w_i / sum(w)`: a small source is repeated, a large one subsampled (open_clip's
`--train-data-upsampling-factors`, with weights as proportions). Each source is an endless
sequence of its shards, cycle `c` being a permutation seeded with (train.seed, source, c); pass
`p` takes the shards of that sequence whose first row falls in `[p * t_i, (p + 1) * t_i)` rows
(`t_i` the source's rows per pass). So over passes every source gets exactly its share, every
shard of a source is used before any is repeated, and a pass's shards are a pure function of
(shards, weights, seed, pass): `passes.py` then cuts and deals them as usual and a resume lands on
the same row. A shard repeated within one pass gets the same crops both times (crops are seeded by pass and
key).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Union

import numpy as np

from storage import StorageConfig, protocol_of
from training.config import DataSource
from training.ingest.plan import Shard, list_shards


def list_training_shards(
    entries: Sequence[Union[str, DataSource]],
    storage: Optional[StorageConfig] = None,
    *,
    what: str = "train.data",
    count_cache: Optional[str] = None,
) -> tuple[Any, list[Shard]]:
    """(filesystem, shards) of `train.data`: plain paths are one source (`list_shards`); weighted
    sources are listed one by one, each shard tagged with its source's index."""
    if not any(isinstance(e, DataSource) for e in entries):
        return list_shards(list(entries), storage, what=what, count_cache=count_cache)
    fs, shards, protocol = None, [], None
    for index, source in enumerate(entries):
        where = f"{what}[{index}] ({source.path})"
        if protocol is not None and protocol_of(source.path) != protocol:
            raise ValueError(f"{where}: all sources must be on one filesystem ({protocol})")
        protocol = protocol_of(source.path)
        source_fs, found = list_shards([source.path], storage, what=where, count_cache=count_cache)
        fs = fs or source_fs
        shards += [dataclasses.replace(s, source=index) for s in found]
    return fs, shards


def mix_pass(shards: Sequence[Shard], weights: Sequence[float], seed: int, pass_index: int) -> list[Shard]:
    """The shards of pass `pass_index` under `weights` (one per source; () = `shards` as they are),
    in source order; a shard may appear more than once."""
    if len(weights) <= 1:
        return list(shards)
    total = sum(s.rows for s in shards)
    out: list[Shard] = []
    for source, weight in enumerate(weights):
        group = [s for s in shards if s.source == source]
        rows = sum(s.rows for s in group)
        if rows == 0:
            raise ValueError(f"train.data[{source}] holds no rows")
        per_pass = total * weight / sum(weights)
        lo, hi = pass_index * per_pass, (pass_index + 1) * per_pass
        for cycle in range(int(lo // rows), int(math.ceil(hi / rows)) + 1):
            start = cycle * rows
            for j in np.random.default_rng([seed, source, cycle, 0x6D6978]).permutation(len(group)):
                if start >= hi:
                    break
                if start >= lo:
                    out.append(group[int(j)])
                start += group[int(j)].rows
    return out
