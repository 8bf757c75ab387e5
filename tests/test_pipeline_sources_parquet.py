"""Compressed parquet inputs (`.parquet.gz`, `.bz2`, `.xz`): read through a temporary file on disk,
never inflated whole in memory (no Ray)."""

from __future__ import annotations

import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig
from pipeline.sources import InputError, list_input_files, read_file


@pytest.mark.parametrize("ext", ["gz", "bz2", "xz"])
def test_a_compressed_parquet_is_inflated_to_a_temp_file_never_whole_in_memory(tmp_path, monkeypatch, ext):
    """Parquet needs random access: a `.parquet.gz` goes through a temporary file on disk, a chunk
    at a time, and the temporary file is gone once reading ends or stops."""
    import bz2
    import lzma
    import random
    import tempfile
    import tracemalloc

    import pipeline.sources.parquet as parquet_reader

    rng = random.Random(0)
    rows = 40_000
    table = pa.table(
        {
            "url": [f"http://a.example/{rng.getrandbits(128):032x}.jpg" for _ in range(rows)],
            "caption": [f"caption {rng.getrandbits(64):016x}" for _ in range(rows)],
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="none")
    raw = sink.getvalue().to_pybytes()
    # An xz decoder holds the compressor's whole dictionary (8 MiB by default), whatever the file
    # size: a 64 KiB one keeps that constant below the bound measured here.
    compress = {
        "gz": gzip.compress,
        "bz2": bz2.compress,
        "xz": lambda b: lzma.compress(b, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 64 << 10}]),
    }[ext]
    (tmp_path / f"pool.parquet.{ext}").write_bytes(compress(raw))
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    monkeypatch.setattr(parquet_reader, "INFLATE_CHUNK_BYTES", 64 << 10)
    data = DataConfig(input=str(tmp_path / f"pool.parquet.{ext}"))
    [file] = list_input_files(data)

    batches, on_disk = [], None
    tracemalloc.start()
    try:
        for batch in read_file(file, data, batch_rows=10_000):
            if on_disk is None:
                on_disk = [p.stat().st_size for p in temp_dir.iterdir()]
            batches.append(batch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert on_disk == [len(raw)]  # the inflated file lies on disk while it is read
    assert peak < len(raw) / 8, f"peak of {peak} bytes held while reading {len(raw)} inflated bytes"
    assert list(temp_dir.iterdir()) == []
    assert [b.num_rows for b in batches] == [10_000] * 4
    out = pa.concat_tables(batches)
    assert out.column("url").to_pylist() == table.column("url").to_pylist()
    assert out.column("caption").to_pylist() == table.column("caption").to_pylist()

    reader = read_file(file, data, batch_rows=10_000)
    next(reader)
    assert len(list(temp_dir.iterdir())) == 1
    reader.close()  # a reader stopped early removes its temporary file too
    assert list(temp_dir.iterdir()) == []


def test_no_room_for_the_inflated_parquet_is_a_clear_error(tmp_path, monkeypatch):
    import errno
    import tempfile

    real = tempfile.NamedTemporaryFile

    class FullDisk:
        def __init__(self, **kwargs):
            self.file = real(**kwargs)
            self.name = self.file.name

        def write(self, chunk):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", FullDisk)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"url": ["http://a/1"], "caption": ["x"]}), sink)
    (tmp_path / "pool.parquet.gz").write_bytes(gzip.compress(sink.getvalue().to_pybytes()))
    data = DataConfig(input=str(tmp_path / "pool.parquet.gz"))
    [file] = list_input_files(data)
    with pytest.raises(
        InputError,
        match=r"pool.parquet.gz: cannot inflate it \(gzip\) into a temporary file in "
        r".*No space left on device.*point TMPDIR at a larger disk",
    ):
        list(read_file(file, data))
