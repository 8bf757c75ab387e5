"""Copy one input file into shard-sized Arrow files under `_work/input/` (the plan's first step).

Each input file becomes chunks of exactly `data.rows_per_shard` rows (the last one shorter), in
file order, named `{file:05d}-{chunk:06d}.arrow`; `resume.make_plan` numbers them into shards.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.config import DataConfig
from pipeline.resume import STAGING
from pipeline.sources import InputFile, read_file
from storage import Folder


def stage_file(index: int, file: InputFile, data: DataConfig, out: Folder) -> dict[str, Any]:
    """Stage one input file; returns `{url, format, rows, chunks: [{name, rows}], schema}`.

    `schema` holds the extra columns' fields (for the shard schema). Raises InputError for a file
    that cannot be read as configured.
    """
    chunks: list[dict[str, Any]] = []
    pending: list[pa.Table] = []
    pending_rows = 0
    rows = 0
    schema = None

    def flush(table: pa.Table) -> None:
        name = f"{STAGING}/{index:05d}-{len(chunks):06d}.arrow"
        out.write_arrow(name, table.combine_chunks())
        chunks.append({"name": name, "rows": table.num_rows})

    for batch in read_file(file, data):
        if schema is None:
            schema = batch.schema
        rows += batch.num_rows
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= data.rows_per_shard:
            table = pa.concat_tables(pending, promote_options="permissive")
            flush(table.slice(0, data.rows_per_shard))
            rest = table.slice(data.rows_per_shard)
            pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
    if pending_rows:
        flush(pa.concat_tables(pending, promote_options="permissive"))
    extra = pa.schema([schema.field(c) for c in data.extra_cols]) if schema is not None else pa.schema([])
    return {"url": file.url, "format": file.format, "rows": rows, "chunks": chunks, "schema": extra}
