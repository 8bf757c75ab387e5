"""Pipeline-layout Parquet shards of the demo's image-text data, written directly (no download),
for the training tests: columns key, url, caption, jpg, width, height, original_width,
original_height, sha256.

    write_shards(folder, copies=2, rows_per_shard=200, side=64) -> list of shard paths
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from clipray.demo_data import draw_image, encode_jpeg, make_samples


def write_shards(
    folder: Path,
    *,
    copies: int = 2,
    rows_per_shard: int = 200,
    side: int = 64,
    split: str = "train",
    seed: int = 0,
    corrupt_keys: Optional[set] = None,
) -> list[Path]:
    """Draw the demo's samples and write them as shards; rows whose key is in `corrupt_keys` get
    bytes that are not an image (to exercise rejection)."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = make_samples(split, copies, seed)
    paths = []
    for start in range(0, len(samples), rows_per_shard):
        part = samples[start : start + rows_per_shard]
        blobs = [
            b"this is not a jpeg"
            if corrupt_keys and s.key in corrupt_keys
            else encode_jpeg(draw_image(s, side), quality=90)
            for s in part
        ]
        table = pa.table(
            {
                "key": [s.key for s in part],
                "url": [f"http://127.0.0.1/{s.key}.jpg" for s in part],
                "caption": [s.caption for s in part],
                "jpg": pa.array(blobs, type=pa.binary()),
                "width": [side] * len(part),
                "height": [side] * len(part),
                "original_width": [side] * len(part),
                "original_height": [side] * len(part),
                "sha256": [hashlib.sha256(b).hexdigest() for b in blobs],
            }
        )
        path = folder / f"{start // rows_per_shard:05d}.parquet"
        pq.write_table(table, path, row_group_size=64)
        paths.append(path)
    return paths
