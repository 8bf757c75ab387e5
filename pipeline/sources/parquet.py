"""Read `.parquet` files, plain or compressed as a whole (`.parquet.gz`, `.bz2`, `.zst`, `.xz`), into
raw batches for `normal_form.normalise`.

Rows are taken as they are: a null URL is still a row (the download rejects it as
`download/invalid_url`). Parquet needs random access (the footer first, then each column chunk),
which a decompressing stream cannot give; a compressed file is therefore inflated, a bounded chunk
at a time, into a temporary file in the system temp dir (`TMPDIR`), read from there in batches,
and the temporary file is removed when reading ends or stops. Memory stays at one chunk plus one
batch, whatever the file's size; the temp dir needs room for the inflated file.
"""

from __future__ import annotations

import tempfile
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.sources.files import InputError, InputFile, open_input
from pipeline.sources.normal_form import POSITION, check_columns, wanted_columns

INFLATE_CHUNK_BYTES = 8 << 20  # bytes of a compressed parquet inflated at a time into the temp file


def read_parquet(file: InputFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    """Raw batches of at most `batch_rows` rows, columns `wanted_columns(data)` with their parquet
    types, and `POSITION` (the row number in the file, from 0)."""
    if file.compression is None:
        with open_input(file, data) as fh, pq.ParquetFile(fh) as pf:
            yield from _batches(file, pf, data, batch_rows)
        return
    with tempfile.NamedTemporaryFile(prefix="clipray-input-", suffix=".parquet") as inflated:
        with open_input(file, data) as fh:
            _inflate(file, fh, inflated)
        with pq.ParquetFile(inflated.name) as pf:
            yield from _batches(file, pf, data, batch_rows)


def _inflate(file: InputFile, source, target) -> None:
    """Copy the decompressed stream `source` into the open temporary file `target`, a chunk of at
    most INFLATE_CHUNK_BYTES at a time."""
    while True:
        chunk = source.read(INFLATE_CHUNK_BYTES)
        if not chunk:
            break
        try:
            target.write(chunk)
        except OSError as exc:  # a full disk, mostly; read errors (bad gzip data) pass through
            raise InputError(
                f"{file.url}: cannot inflate it ({file.compression}) into a temporary file in "
                f"{tempfile.gettempdir()}: {exc}; free space there, point TMPDIR at a larger disk, "
                "or store the file uncompressed (parquet compresses its columns itself)"
            ) from None
    target.flush()


def _batches(file: InputFile, pf: pq.ParquetFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    check_columns(file, pf.schema_arrow.names, data)
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=wanted_columns(data)):
        table = pa.Table.from_batches([batch])
        yield table.append_column(POSITION, pa.array(range(row, row + table.num_rows), pa.int64()))
        row += table.num_rows
