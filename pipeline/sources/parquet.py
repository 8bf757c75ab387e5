"""Read `.parquet` files, plain or compressed as a whole (`.parquet.gz`, `.bz2`, `.zst`, `.xz`), into
raw batches for `normal_form.normalise`.

Rows are taken as they are: a null URL is still a row (the download rejects it as
`download/invalid_url`). A compressed file is inflated into memory (parquet needs random access).
"""
from __future__ import annotations

import io
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.sources.files import InputFile, open_input
from pipeline.sources.normal_form import POSITION, check_columns, wanted_columns


def read_parquet(file: InputFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    """Raw batches of at most `batch_rows` rows, columns `wanted_columns(data)` with their parquet
    types, and `POSITION` (the row number in the file, from 0)."""
    with open_input(file, data) as fh:
        source = io.BytesIO(fh.read()) if file.compression else fh
        yield from _batches(file, pq.ParquetFile(source), data, batch_rows)


def _batches(file: InputFile, pf: pq.ParquetFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    check_columns(file, pf.schema_arrow.names, data)
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=wanted_columns(data)):
        table = pa.Table.from_batches([batch])
        yield table.append_column(POSITION, pa.array(range(row, row + table.num_rows), pa.int64()))
        row += table.num_rows
