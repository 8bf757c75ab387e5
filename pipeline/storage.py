"""Files on local disk or any fsspec store, and the output folder that nothing writes outside of.

Every file the pipeline writes goes through `OutputDir`, whose names are relative paths checked to
stay under `data.output` (no absolute paths, no `..`). Writes are atomic: on a local disk a file is
written under a hidden temporary name in its folder (`.name.<random>.tmp`, which Parquet readers
skip) and renamed into place; on object stores (s3://) an object only appears when its upload
completes, so a killed writer never leaves a half-written file that looks finished.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from typing import Any, Iterable, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

def protocol_of(url: str) -> str:
    """`s3://b/k` -> `s3`; a plain path -> `file`."""
    if "://" in url:
        return url.split("://", 1)[0].lower()
    return "file"


def filesystem(url: str, storage_options: Optional[dict[str, Any]] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or fsspec URL.

    `storage_options` go to remote filesystems only (a local path ignores s3 credentials).
    """
    options = storage_options if protocol_of(url) != "file" else {}
    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    return fs, path


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers do not share the driver's working directory)."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if protocol_of(url) == "file":
        return os.path.abspath(os.path.expanduser(url))
    return url


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def safe_relative(name: str) -> str:
    """A normalised relative path that stays inside its root, or ValueError."""
    if not name or name.startswith(("/", "\\")) or "://" in name or "\x00" in name:
        raise ValueError(f"refusing to write {name!r}: output names must be relative paths under data.output")
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm == "." or norm.startswith("../") or norm == ".." or "/../" in f"/{norm}/":
        raise ValueError(f"refusing to write {name!r}: it leaves data.output")
    return norm


class OutputDir:
    """The folder `data.output` (local or fsspec URL); all pipeline writes go through here."""

    def __init__(self, url: str, storage_options: Optional[dict[str, Any]] = None):
        self.url = absolute(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self.root = self.root.rstrip("/") or "/"
        self.local = is_local(self.fs)

    def __reduce__(self):  # picklable for Ray: rebuild the filesystem on the other side
        return (OutputDir, (self.url, self.storage_options))

    def path(self, name: str) -> str:
        """Filesystem path of `name` (relative to the output root)."""
        return f"{self.root}/{safe_relative(name)}"

    def full_url(self, name: str) -> str:
        """`name` as a URL users can open (with the protocol for remote stores)."""
        rel = safe_relative(name)
        return f"{self.url}/{rel}"

    def makedirs(self, name: str) -> None:
        if self.local:
            os.makedirs(self.path(name), exist_ok=True)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def list(self, folder: str, suffix: str = "", hidden: bool = False) -> list[str]:
        """Names (relative to the root) of the files directly in `folder`, sorted."""
        base = self.path(folder)
        try:
            entries = self.fs.ls(base, detail=False, refresh=True) if not self.local else self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            entry = entry.rstrip("/")
            leaf = entry.rsplit("/", 1)[-1]
            if leaf.endswith(suffix) and (hidden or not leaf.startswith(".")):
                names.append(f"{safe_relative(folder)}/{leaf}")
        return sorted(names)

    def size(self, name: str) -> int:
        return int(self.fs.size(self.path(name)))

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            try:
                self.fs.rm(self.path(name))
            except FileNotFoundError:
                pass

    def remove_tree(self, folder: str) -> None:
        path = self.path(folder)
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic write: readers see the whole file or nothing."""
        if self.local:
            def write(path: str) -> None:
                with open(path, "wb") as fh:
                    fh.write(data)

            self._write_local(name, write)
        else:
            self.fs.pipe_file(self.path(name), data)

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=False).encode())

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_parquet(self, name: str, table: pa.Table, row_group_rows: int = 1024) -> int:
        """Write `table` as one Parquet file (atomically); returns its size in bytes."""
        sink = self.parquet_sink(name, table.schema, row_group_rows)
        try:
            sink.write(table)
        except BaseException:
            sink.abort()
            raise
        return sink.close()

    def parquet_sink(self, name: str, schema: pa.Schema, row_group_rows: int = 1024) -> "ParquetSink":
        """A Parquet file written in pieces that appears (atomically) on `close()`."""
        return ParquetSink(self, name, schema, row_group_rows)

    def _write_local(self, name: str, write) -> int:
        """Atomic local write through a function of a temporary path; returns the size."""
        target = self.path(name)
        folder, leaf = os.path.split(target)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{leaf}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            size = os.path.getsize(tmp)
            os.replace(tmp, target)
            return size
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def read_parquet(self, name: str, columns: Optional[list[str]] = None) -> pa.Table:
        with self.fs.open(self.path(name), "rb") as fh:
            return pq.read_table(fh, columns=columns)

    def write_arrow(self, name: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        with pa.ipc.new_file(buf, table.schema) as writer:
            writer.write_table(table)
        self.write_bytes(name, buf.getvalue())

    def read_arrow(self, name: str) -> pa.Table:
        data = self.read_bytes(name)
        return pa.ipc.open_file(pa.BufferReader(data)).read_all()


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """Binary columns (encoded images) are stored plain: JPEG bytes do not compress, and
    compressing, dictionary-encoding and computing min/max statistics over them cost about three
    quarters of the write time for nothing. Other columns: snappy, dictionary, statistics."""
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    other = [n for n in schema.names if n not in binary]
    return dict(compression={**{n: "snappy" for n in other}, **{n: "none" for n in binary}},
                use_dictionary=other, write_statistics=other)


class ParquetSink:
    """One Parquet file written row group by row group; readers see it only after `close()`.

    Local disks: a hidden temporary file in the target folder, fsync'ed and renamed on close.
    Object stores: the file is assembled in memory and uploaded in one piece on close.
    """

    def __init__(self, out: OutputDir, name: str, schema: pa.Schema, row_group_rows: int = 1024):
        self.out, self.name, self.row_group_rows = out, name, row_group_rows
        options = parquet_options(schema)
        if out.local:
            target = out.path(name)
            folder, leaf = os.path.split(target)
            os.makedirs(folder, exist_ok=True)
            self.target, self.tmp = target, os.path.join(folder, f".{leaf}.{uuid.uuid4().hex[:12]}.tmp")
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
                fd = os.open(self.tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                size = os.path.getsize(self.tmp)
                os.replace(self.tmp, self.target)
                return size
            data = self.buffer.getvalue()
            self.out.write_bytes(self.name, data)
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
