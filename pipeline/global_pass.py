"""The global pass: filters that need every downloaded shard before they can decide (CLIP-score
top fraction, exact image dedup by sha256), applied shard by shard once the decisions are made.
(The (url, caption) dedup needs no download: `run._pair_duplicates` decides it before.)

Order: the CLIP-score cut first (rows below the cut are rejected as `filter/clip_score`), then
image dedup among the rows that pass it (`dedup/duplicate`, the first row by key is kept). The
decisions (`cut` and the duplicate keys) are computed once and committed in
`_state/global/decisions.json` + `_state/global/duplicates.parquet`, so a resumed run applies
the same decisions to the shards it had not finished.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.reasons import DEDUP, FILTER, Rejection
from pipeline.resume import GLOBAL, ShardSpec, marker
from pipeline.shards import rejects_table, tar_stats_file, write_tar_shard
from storage import Folder

DECISIONS = "_state/global/decisions.json"
DUPLICATES = "_state/global/duplicates.parquet"
DUPLICATE_SCHEMA = pa.schema(
    [pa.field("key", pa.string()), pa.field("first_key", pa.string()), pa.field("by", pa.string())]
)


def apply_to_shard(
    spec: ShardSpec, out: Folder, cut: Optional[float], cut_detail: str, duplicates: pa.Table
) -> dict[str, Any]:
    """Write the shard's final `shards/` file and its global rejects; commit the shard.

    cut: rows with a CLIP score below it are rejected (None: no CLIP filter).
    duplicates: rows of `DUPLICATE_SCHEMA` for this shard (key, first_key, by).
    """
    start = time.time()
    side = [tar_stats_file(spec.final_file)] if spec.output_format == "webdataset" else []
    out.remove([spec.final_file, *side, spec.global_rejects_file, marker(GLOBAL, spec)])
    stats: dict[str, Any] = {
        "shard": spec.name,
        "accepted": 0,
        "rejected": 0,
        "reasons": {},
        "stages": {},
        "final_file": None,
        "final_bytes": 0,
        "rejects_file": None,
    }
    if not out.exists(spec.accepted_file):
        out.write_json(marker(GLOBAL, spec), stats)
        return stats
    table = out.read_parquet(spec.accepted_file)
    keys = table.column("key").to_pylist()
    rejections: dict[int, Rejection] = {}
    if cut is not None:
        scores_table = out.read_parquet(spec.score_file)
        if scores_table.column("key").to_pylist() != keys:
            raise RuntimeError(
                f"{spec.score_file} does not match {spec.accepted_file} row for row; "
                f"delete {marker('score', spec)} and rerun"
            )
        scores = scores_table.column("score").to_numpy(zero_copy_only=False)
        for i in np.nonzero(~(scores >= cut))[0]:
            rejections[int(i)] = Rejection(
                FILTER, "clip_score", f"CLIP score {scores[i]:.4f} < {cut:.4f} ({cut_detail})"
            )
    if duplicates.num_rows:
        position = {k: i for i, k in enumerate(keys)}
        for key, first, by in zip(*(duplicates.column(c).to_pylist() for c in ("key", "first_key", "by"))):
            i = position.get(key)
            if i is None:
                raise RuntimeError(f"duplicate decision for key {key}, which is not in {spec.accepted_file}")
            rejections.setdefault(i, Rejection(DEDUP, "duplicate", f"same {by} as key {first}"))
    keep = np.ones(len(keys), dtype=bool)
    keep[list(rejections)] = False
    kept = table.filter(pa.array(keep))
    if kept.num_rows:
        if spec.output_format == "webdataset":
            stats["final_bytes"] = write_tar_shard(out, spec.final_file, kept, input_rows=spec.rows)
        else:
            stats["final_bytes"] = out.write_parquet(spec.final_file, kept)
        stats["final_file"] = spec.final_file
    if rejections:
        order = sorted(rejections)
        idx = pa.array(order, pa.int64())
        rejects = rejects_table(
            table.column("key").take(idx),
            table.column("url").take(idx),
            table.column("caption").take(idx),
            [rejections[i] for i in order],
        )
        out.write_parquet(spec.global_rejects_file, rejects)
        stats["rejects_file"] = spec.global_rejects_file
    stats.update(
        accepted=kept.num_rows,
        rejected=len(rejections),
        reasons=dict(Counter(r.reason for r in rejections.values())),
        stages=dict(Counter(r.stage for r in rejections.values())),
        duration_s=round(time.time() - start, 3),
    )
    out.write_json(marker(GLOBAL, spec), stats)
    return stats


def describe_cut(threshold: Optional[float], top_fraction: Optional[float], cut: float, scored: int) -> str:
    parts = []
    if threshold is not None:
        parts.append(f"threshold {threshold:g}")
    if top_fraction is not None:
        parts.append(f"top {top_fraction:.0%} of {scored} scored rows")
    return ", ".join(parts) if parts else f"cut {cut:g}"


def split_by_shard(duplicates: pa.Table, specs: list[ShardSpec]) -> dict[str, pa.Table]:
    """Duplicate decisions grouped by the shard whose key prefix they carry."""
    if duplicates.num_rows == 0:
        return {}
    width = len(specs[0].name)
    prefixes = pc.utf8_slice_codeunits(duplicates.column("key"), 0, width)
    out = {}
    for name in pc.unique(prefixes).to_pylist():
        out[name] = duplicates.filter(pc.equal(prefixes, name))
    return out
