"""Read WebDataset `.tar` shards (img2dataset's / DataComp's layout) as pipeline input: existing
data re-filtered, deduplicated and re-sharded without downloading anything.

One row per sample (the format's rules are `storage.webdataset`'s): the image member's bytes go to
the staged `LOCAL_IMAGE` column, which the download step uses instead of fetching the URL; the
caption is the `.txt` member (as `data.caption_col`); every field of the `.json` member
(img2dataset writes url, key, status, sizes, the input's extra columns) is a column, so
`data.url_col` (default `url`) and `data.extra_cols` name fields of the JSON. A sample without an
image member, a `.json` that does not parse, or a tar cut off before its end becomes a row with
`source_error` set (rejected as `filter/malformed_row`, the detail naming the shard and sample);
a sample without a caption keeps a null caption (`filter/caption_not_text`).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pyarrow as pa

from pipeline.config import LOCAL_IMAGE, DataConfig
from pipeline.sources.files import InputFile, open_input
from pipeline.sources.normal_form import POSITION, check_columns, wanted_columns
from storage.webdataset import read_samples

SAMPLE_BATCH_ROWS = 1024  # rows per batch: each holds an encoded image


def read_webdataset(file: InputFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    """Raw batches of at most min(batch_rows, SAMPLE_BATCH_ROWS) samples: `wanted_columns(data)`,
    `LOCAL_IMAGE`, `source_error` and `POSITION` (the sample's index in the tar)."""
    columns = wanted_columns(data)
    batch_rows = min(batch_rows, SAMPLE_BATCH_ROWS)
    rows: list[dict[str, Any]] = []
    checked = False
    count = 0
    with open_input(file, data) as fh:
        reader = read_samples(fh, file.url)
        for position, sample in enumerate(reader):
            count += 1
            row, problem = _row(sample, data)
            if not checked and problem is None:
                check_columns(file, sorted(set(row) | {data.url_col, data.caption_col}), data)
                checked = True
            rows.append(
                {
                    **{c: row.get(c) for c in columns},
                    LOCAL_IMAGE: sample.image,
                    "source_error": None if problem is None else f"{file.url}: sample {sample.key!r} {problem}",
                    POSITION: position,
                }
            )
            if len(rows) == batch_rows:
                yield _table(rows, columns)
                rows = []
        if reader.truncated is not None:
            rows.append(
                {
                    **{c: None for c in columns},
                    LOCAL_IMAGE: None,
                    "source_error": f"{file.url}: the tar ends early after {count} sample(s) "
                    f"({reader.truncated}); the samples after the cut are lost",
                    POSITION: -1,
                }
            )
    if rows:
        yield _table(rows, columns)


def _row(sample, data: DataConfig) -> tuple[dict[str, Any], Any]:
    """The sample's fields ({json fields, caption_col: caption}) and its problem (None: readable)."""
    fields: dict[str, Any] = {}
    problem = None
    if sample.metadata is not None:
        try:
            parsed = json.loads(sample.metadata)
            if isinstance(parsed, dict):
                fields.update(parsed)
            else:
                problem = "has a .json that is not an object"
        except ValueError as exc:
            problem = f"has a .json that does not parse ({exc})"
    fields[data.caption_col] = sample.caption
    if sample.image is None:
        problem = f"has no image member (members: {', '.join(sorted(sample.members)) or 'none'})"
    return fields, problem


def _table(rows: list[dict[str, Any]], columns: list[str]) -> pa.Table:
    out = {}
    for c in columns:
        values = [r[c] for r in rows]
        # JSON values of any type: text for url/caption, as parsed otherwise (lists, numbers, ...)
        try:
            out[c] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            out[c] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    out[LOCAL_IMAGE] = pa.array([r[LOCAL_IMAGE] for r in rows], pa.binary())
    out["source_error"] = pa.array([r["source_error"] for r in rows], pa.string())
    out[POSITION] = pa.array([r[POSITION] for r in rows], pa.int64())
    return pa.table(out)
