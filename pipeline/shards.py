"""The tables the pipeline writes: accepted rows (`shards/`), rejected rows (`rejects/`) and the
small per-shard index the global pass (image dedup, CLIP-score cut) reads. Column names and types are
the "Pipeline outputs" contract of DESIGN.md. With `data.output_format: webdataset` the accepted rows
of a shard become `shards/{n}.tar` in img2dataset's layout (`write_tar_shard`).
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa

from pipeline.reasons import Rejection
from storage import Folder, redact_text, redact_userinfo
from storage.webdataset import STATS_SUFFIX, TAR_SUFFIX, TarShardWriter, image_extension

IMAGE_FIELDS = [
    pa.field("jpg", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("sha256", pa.string()),
]

REJECT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)

INDEX_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("sha256", pa.string()),
    ]
)


def accepted_schema(extra: pa.Schema) -> pa.Schema:
    """key, url, caption, jpg, width, height, original_width, original_height, sha256, extras."""
    return pa.schema(
        [
            pa.field("key", pa.string()),
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),
            *IMAGE_FIELDS,
            *extra,
        ]
    )


def make_keys(prefix: str, rows: Sequence[int], row_digits: int) -> pa.Array:
    return pa.array([f"{prefix}{r:0{row_digits}d}" for r in rows], type=pa.string())


def rejects_table(keys: pa.Array, urls: pa.Array, captions: pa.Array, rejections: Sequence[Rejection]) -> pa.Table:
    return pa.table(
        {
            "key": keys,
            "url": redact_userinfo_column(urls),
            "caption": captions,
            "stage": pa.array([r.stage for r in rejections], pa.string()),
            "reason": pa.array([r.reason for r in rejections], pa.string()),
            "detail": pa.array([redact_text(r.detail)[:2000] for r in rejections], pa.string()),
        },
        schema=REJECT_SCHEMA,
    )


def redact_userinfo_column(urls: pa.Array) -> pa.Array:
    """URLs without their userinfo (`https://user:pass@host/` -> `https://***@host/`): what is a
    password in a URL list must not be stored in shards or rejects. Only values with '@' are touched."""
    values = urls.to_pylist()
    if not any(isinstance(u, str) and "@" in u for u in values):
        return urls
    return pa.array([redact_userinfo(u) if isinstance(u, str) and "@" in u else u for u in values], urls.type)


def empty_rejects() -> pa.Table:
    return REJECT_SCHEMA.empty_table()


def tar_stats_file(tar_name: str) -> str:
    """`shards/00001.tar` -> `shards/00001_stats.json` (img2dataset's name for a shard's stats)."""
    return tar_name[: -len(TAR_SUFFIX)] + STATS_SUFFIX


def write_tar_shard(out: Folder, name: str, table: pa.Table, input_rows: int) -> int:
    """The accepted rows of one shard as a WebDataset tar in img2dataset's layout: per row
    `{key}.{jpg|png|webp}` (the encoded image), `{key}.txt` (the caption) and `{key}.json` (every
    other column, as img2dataset's metadata: url, caption, key, sizes, sha256, extras, status);
    then `{n}_stats.json` (`count` = input rows of the shard, `successes` = samples in the tar),
    which training reads as the shard's sample count. Both appear atomically; returns the tar's size.
    """
    import io

    buf = io.BytesIO()
    writer = TarShardWriter(buf)
    meta_columns = [c for c in table.column_names if c != "jpg"]
    metas = table.select(meta_columns).to_pylist()
    for meta, image in zip(metas, table.column("jpg").to_pylist()):
        meta["status"] = "success"
        writer.write(meta["key"], image, image_extension(image), meta["caption"] or "", meta)
    writer.close()
    data = buf.getvalue()
    out.write_bytes(name, data)
    out.write_json(
        tar_stats_file(name),
        {"count": input_rows, "successes": table.num_rows, "failed": input_rows - table.num_rows},
    )
    return len(data)
