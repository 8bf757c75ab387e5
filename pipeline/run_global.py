"""The Ray wiring of the passes over the whole run (`run.py` calls them):

- the (url, caption) dedup before the download (`pair_duplicates`): Ray Data groupby per hash
  bucket over the staged input, decisions committed in `_state/pairs/`;
- the CLIP score (an actor pool, GPU if asked) and the global pass (`global_pass`): the CLIP-score
  cut and the image dedup decided over all shards (groupby per hash bucket), committed, then each
  shard rewritten without the rejected rows (Ray Data tasks).

The decisions themselves are plain functions in `dedup.py`, `global_pass.py`, `filters.py` and
`clip_score.py`.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline.config import DataConfig
from pipeline.dedup import (
    PAIR_DECISIONS,
    PAIR_DUPLICATES,
    bucket_prefix_length,
    later_duplicates,
    pair_index,
    with_bucket,
)
from pipeline.filters import clip_score_cut
from pipeline.global_pass import DECISIONS, DUPLICATE_SCHEMA, DUPLICATES, apply_to_shard, describe_cut, split_by_shard
from pipeline.progress import progress, say
from pipeline.resume import GLOBAL, SCORE, Plan, ShardSpec, markers
from storage import Folder

log = logging.getLogger("clipray.pipeline")


class _ScoreUDF:
    def __init__(self, data: DataConfig, out: Folder):
        from pipeline.clip_score import ClipScorer

        cfg = data.filters.clip_score
        self.out = out
        self.scorer = ClipScorer(cfg.model, cfg.model_name, batch_size=cfg.batch_size, storage=data)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        stats = []
        for spec_json, accepted in zip(batch["spec"], batch["accepted"]):
            stats.append(self.scorer.score_shard(ShardSpec.from_dict(json.loads(spec_json)), self.out, int(accepted)))
        return {"stats": [json.dumps(s) for s in stats]}


def _load_index(batch: dict[str, np.ndarray], out: Folder, cut: Optional[float]) -> pa.Table:
    """Ray Data UDF: the image-dedup index rows (key, sha256) of some shards, CLIP cut applied."""
    tables = []
    for spec_json in batch["spec"]:
        spec = ShardSpec.from_dict(json.loads(spec_json))
        index = out.read_parquet(spec.index_file, columns=["key", "sha256"])
        if cut is not None:
            scores = out.read_parquet(spec.score_file, columns=["score"]).column("score").to_numpy(zero_copy_only=False)
            index = index.filter(pa.array(scores >= cut))
        tables.append(index)
    return (
        pa.concat_tables(tables)
        if tables
        else pa.table({"key": pa.array([], pa.string()), "sha256": pa.array([], pa.string())})
    )


def _load_pairs(batch: dict[str, np.ndarray], out: Folder, data: DataConfig) -> pa.Table:
    """Ray Data UDF: (key, pair digest) of the staged input rows of some shards that would be
    downloaded (see `dedup.pair_index`)."""
    from pipeline.filters import RowFilters

    from pipeline.column_filters import load_cuts

    filters = RowFilters(data.filters, load_cuts(out))
    tables = []
    for spec_json in batch["spec"]:
        spec = ShardSpec.from_dict(json.loads(spec_json))
        table = out.read_arrow(spec.input)
        tables.append(pair_index(table, [spec.key(r) for r in range(table.num_rows)], filters))
    return (
        pa.concat_tables(tables)
        if tables
        else pa.table({"key": pa.array([], pa.string()), "pair": pa.array([], pa.string())})
    )


def _duplicates_in_bucket(group: pa.Table, digest_col: str, by: str) -> pa.Table:
    found = later_duplicates(group, digest_col)
    return pa.table(
        {
            "key": found.column("key"),
            "first_key": found.column("first_key"),
            "by": pa.array([by] * found.num_rows, pa.string()),
        },
        schema=DUPLICATE_SCHEMA,
    )


def _duplicates_on_ray(
    shards: list[ShardSpec], loader, loader_kwargs: dict, digest_col: str, by: str, rows: int
) -> pa.Table:
    """Rows whose `digest_col` appeared with a smaller key, over the index rows `loader` makes of
    `shards` (a Ray Data UDF), grouped per hash bucket so no process holds every key; sorted by key."""
    import ray

    if not shards:
        return DUPLICATE_SCHEMA.empty_table()
    index = ray.data.from_items(
        [{"spec": json.dumps(s.to_dict())} for s in shards], override_num_blocks=min(len(shards), 200)
    )
    index = index.map_batches(loader, fn_kwargs=loader_kwargs, batch_size=16, batch_format="numpy")
    prefix = bucket_prefix_length(rows)
    # Hash-shuffle partitions: a few per million rows (Ray's default of 200 costs more than the
    # work below a few million rows); each holds whole buckets.
    partitions = max(1, min(200, 16**prefix, rows // 250_000 + 1))
    bucketed = index.map_batches(
        with_bucket, fn_kwargs={"digest_col": digest_col, "prefix": prefix}, batch_format="pyarrow"
    )
    dups = bucketed.groupby("bucket", num_partitions=partitions).map_groups(
        _duplicates_in_bucket, fn_kwargs={"digest_col": digest_col, "by": by}, batch_format="pyarrow"
    )
    found = [ray.get(ref) for ref in dups.to_arrow_refs()]
    tables = [t.cast(DUPLICATE_SCHEMA) for t in found if t.num_rows]
    return pa.concat_tables(tables).sort_by("key") if tables else DUPLICATE_SCHEMA.empty_table()


def _find_duplicates(
    data: DataConfig, out: Folder, shards: list[ShardSpec], rows: int, cut: Optional[float]
) -> pa.Table:
    """Image duplicates (same sha256) among the downloaded rows that pass the CLIP cut."""
    return _duplicates_on_ray(shards, _load_index, {"out": out, "cut": cut}, "sha256", "image sha256", rows)


def pair_duplicates(data: DataConfig, out: Folder, plan: Plan) -> dict[str, list]:
    """{shard name: [[row, first key], ...]} of the rows that repeat an earlier (url, caption).

    Decided once over the whole input before any download and committed (`dedup.PAIR_DECISIONS`
    written after `PAIR_DUPLICATES`), so a resumed run rejects the same rows; which copy is kept
    (the smallest key) does not depend on timing."""
    if not out.exists(PAIR_DECISIONS):
        start = time.time()
        duplicates = _duplicates_on_ray(
            plan.shards, _load_pairs, {"out": out, "data": data}, "pair", "url and caption", plan.input_rows
        )
        out.write_parquet(PAIR_DUPLICATES, duplicates, row_group_rows=65_536)
        out.write_json(
            PAIR_DECISIONS, {"duplicates": duplicates.num_rows, "duration_s": round(time.time() - start, 3)}
        )  # the commit
        say(data, f"dedup (url, caption): {duplicates.num_rows} repeated rows will not be downloaded")
    per_shard = split_by_shard(out.read_parquet(PAIR_DUPLICATES), plan.shards)
    result = {}
    for name, table in per_shard.items():
        width = len(name)
        result[name] = [
            [int(key[width:]), first]
            for key, first in zip(table.column("key").to_pylist(), table.column("first_key").to_pylist())
        ]
    return result


def _apply_batch(batch: dict[str, np.ndarray], out: Folder, cut: Optional[float], cut_detail: str) -> dict:
    stats = []
    for spec_json, dups_json in zip(batch["spec"], batch["duplicates"]):
        rows = json.loads(dups_json)
        dups = pa.table(
            {"key": [r[0] for r in rows], "first_key": [r[1] for r in rows], "by": [r[2] for r in rows]},
            schema=DUPLICATE_SCHEMA,
        )
        stats.append(apply_to_shard(ShardSpec.from_dict(json.loads(spec_json)), out, cut, cut_detail, dups))
    return {"stats": [json.dumps(s) for s in stats]}


def global_pass(data: DataConfig, out: Folder, plan: Plan, downloads: dict[str, dict]) -> dict[str, dict]:
    import ray

    f = data.filters
    with_rows = [s for s in plan.shards if downloads[s.name]["accepted"] > 0]
    if f.clip_score is not None:
        done = markers(out, SCORE, with_rows)
        todo = [s for s in with_rows if s.name not in done]
        if todo:
            actors = min(f.clip_score.num_actors, len(todo))
            ds = ray.data.from_items(
                [{"spec": json.dumps(s.to_dict()), "accepted": downloads[s.name]["accepted"]} for s in todo],
                override_num_blocks=len(todo),
            )
            scored = ds.map_batches(
                _ScoreUDF,
                fn_constructor_kwargs={"data": data, "out": out},
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=1,
                num_gpus=f.clip_score.num_gpus or None,
            )
            rows = sum(downloads[s.name]["accepted"] for s in todo)
            for _ in progress(data, scored, "clip score", rows):
                pass

    if not out.exists(DECISIONS):
        cut, cut_detail, scored_rows = None, "", 0
        if f.clip_score is not None:
            scores = _read_scores(out, with_rows)
            scored_rows = len(scores)
            cut = clip_score_cut(scores, f.clip_score.threshold, f.clip_score.top_fraction)
            cut_detail = describe_cut(f.clip_score.threshold, f.clip_score.top_fraction, cut, scored_rows)
        duplicates = DUPLICATE_SCHEMA.empty_table()
        if f.dedup_sha256:
            rows = sum(downloads[s.name]["accepted"] for s in with_rows)
            duplicates = _find_duplicates(data, out, with_rows, rows, cut)
        out.write_parquet(DUPLICATES, duplicates, row_group_rows=65_536)
        out.write_json(
            DECISIONS,
            {"cut": cut, "cut_detail": cut_detail, "scored_rows": scored_rows, "duplicates": duplicates.num_rows},
        )  # the commit of the decisions
    decisions = out.read_json(DECISIONS)
    cut = decisions["cut"]
    cut = float(cut) if cut is not None else None
    per_shard = split_by_shard(out.read_parquet(DUPLICATES), plan.shards)

    results = markers(out, GLOBAL, plan.shards)
    todo = [s for s in plan.shards if s.name not in results]
    if todo:
        items = []
        for s in todo:
            dups = per_shard.get(s.name)
            rows = (
                []
                if dups is None
                else [list(r) for r in zip(*(dups.column(c).to_pylist() for c in ("key", "first_key", "by")))]
            )
            items.append({"spec": json.dumps(s.to_dict()), "duplicates": json.dumps(rows)})
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        applied = ds.map_batches(
            _apply_batch,
            fn_kwargs={"out": out, "cut": cut, "cut_detail": decisions["cut_detail"]},
            batch_size=1,
            batch_format="numpy",
            num_cpus=1,
        )
        rows = sum(downloads[s.name]["accepted"] for s in todo)
        for stats in progress(data, applied, "dedup/filter", rows):
            results[stats["shard"]] = stats
    return results


def _read_scores(out: Folder, shards: list[ShardSpec]) -> np.ndarray:
    def one(spec: ShardSpec) -> np.ndarray:
        return out.read_parquet(spec.score_file, columns=["score"]).column("score").to_numpy(zero_copy_only=False)

    with ThreadPoolExecutor(16) as pool:
        parts = list(pool.map(one, shards))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
