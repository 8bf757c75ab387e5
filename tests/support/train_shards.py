"""Shards of the demo's image-text data, written directly (no download), for the training tests.

write_shards(folder, copies=2, rows_per_shard=200, side=64) -> list of shard paths
    pipeline-layout Parquet: key, url, caption, jpg, width, height, original_width,
    original_height, sha256
write_webdataset_shards(folder, ...) -> list of tar paths
    the same rows as WebDataset tars written the way img2dataset writes them
    (`webdataset.TarWriter`: {key}.jpg, {key}.json, {key}.txt; `{n}_stats.json` beside `{n}.tar`)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from clipray.demo_data import draw_image, encode_jpeg, make_samples


def _shard_rows(copies, rows_per_shard, side, split, seed, corrupt_keys) -> list[list[dict]]:
    """The rows of each shard: key, url, caption, jpg (not an image for `corrupt_keys`)."""
    samples = make_samples(split, copies, seed)
    shards = []
    for start in range(0, len(samples), rows_per_shard):
        shards.append(
            [
                {
                    "key": s.key,
                    "url": f"http://127.0.0.1/{s.key}.jpg",
                    "caption": s.caption,
                    "jpg": b"this is not a jpeg"
                    if corrupt_keys and s.key in corrupt_keys
                    else encode_jpeg(draw_image(s, side), quality=90),
                }
                for s in samples[start : start + rows_per_shard]
            ]
        )
    return shards


def write_shards(
    folder: Path,
    *,
    copies: int = 2,
    rows_per_shard: int = 200,
    side: int = 64,
    split: str = "train",
    seed: int = 0,
    corrupt_keys: Optional[set] = None,
    row_group_size: int = 64,
) -> list[Path]:
    """Draw the demo's samples and write them as shards; rows whose key is in `corrupt_keys` get
    bytes that are not an image (to exercise rejection)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, part in enumerate(_shard_rows(copies, rows_per_shard, side, split, seed, corrupt_keys)):
        blobs = [r["jpg"] for r in part]
        table = pa.table(
            {
                "key": [r["key"] for r in part],
                "url": [r["url"] for r in part],
                "caption": [r["caption"] for r in part],
                "jpg": pa.array(blobs, type=pa.binary()),
                "width": [side] * len(part),
                "height": [side] * len(part),
                "original_width": [side] * len(part),
                "original_height": [side] * len(part),
                "sha256": [hashlib.sha256(b).hexdigest() for b in blobs],
            }
        )
        path = folder / f"{index:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def write_webdataset_shards(
    folder: Path,
    *,
    copies: int = 2,
    rows_per_shard: int = 200,
    side: int = 64,
    split: str = "train",
    seed: int = 0,
    corrupt_keys: Optional[set] = None,
    stats: bool = True,
) -> list[Path]:
    """The rows `write_shards` writes, as img2dataset's WebDataset output: `{n:05d}.tar` through
    `webdataset.TarWriter` (samples {"__key__", "jpg", "txt", "json"}) and, with `stats`,
    `{n:05d}_stats.json` (img2dataset's logger fields; `successes` = samples in the tar)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, part in enumerate(_shard_rows(copies, rows_per_shard, side, split, seed, corrupt_keys)):
        path = folder / f"{index:05d}.tar"
        with open(path, "wb") as fh:
            writer = wds.TarWriter(fh)
            for r in part:
                meta = {"key": r["key"], "url": r["url"], "caption": r["caption"], "width": side, "height": side}
                writer.write({"__key__": r["key"], "jpg": r["jpg"], "txt": r["caption"], "json": json.dumps(meta)})
            writer.close()
        if stats:
            (folder / f"{index:05d}_stats.json").write_text(
                json.dumps({"count": len(part), "successes": len(part), "failed_to_download": 0, "failed_to_resize": 0})
            )
        paths.append(path)
    return paths
