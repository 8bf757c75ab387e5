"""Parquet files written row group by row group that appear atomically when closed."""

from __future__ import annotations

import io
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.folder import Folder, commit_local, temporary_name


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """Binary columns (encoded images) are stored plain: JPEG bytes do not compress, and
    compressing, dictionary-encoding and computing min/max statistics over them cost about three
    quarters of the write time for nothing. Other columns: snappy, dictionary, statistics."""
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    other = [n for n in schema.names if n not in binary]
    return dict(
        compression={**{n: "snappy" for n in other}, **{n: "none" for n in binary}},
        use_dictionary=other,
        write_statistics=other,
    )


class ParquetSink:
    """One Parquet file written row group by row group; readers see it only after `close()`.

    Local disks: a hidden temporary file in the target folder, fsync'ed and renamed on close.
    Object stores: the file is assembled in memory and uploaded in one piece on close.
    """

    def __init__(self, folder: Folder, name: str, schema: pa.Schema, row_group_rows: int = 1024):
        self.folder, self.name, self.row_group_rows = folder, name, row_group_rows
        options = parquet_options(schema)
        if folder.local:
            self.target = folder.path(name)
            os.makedirs(os.path.dirname(self.target), exist_ok=True)
            self.tmp = temporary_name(self.target)
            self.buffer = None
            self.writer = pq.ParquetWriter(self.tmp, schema, **options)
        else:
            self.buffer = io.BytesIO()
            self.writer = pq.ParquetWriter(self.buffer, schema, **options)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=self.row_group_rows)

    def close(self) -> int:
        """Finish the file and make it appear; returns its size in bytes."""
        try:
            self.writer.close()
            if self.buffer is None:
                return commit_local(self.tmp, self.target)
            data = self.buffer.getvalue()
            self.folder.write_bytes(self.name, data)
            return len(data)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - already failing; the file is thrown away anyway
            pass
        if self.buffer is None and os.path.exists(self.tmp):
            os.remove(self.tmp)
