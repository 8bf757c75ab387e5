"""`Folder`: a root folder on any filesystem (local or fsspec URL) and the files under it.

Every file a stage writes goes through a `Folder`: names are relative paths checked to stay under
the root (no absolute paths, no `..`), and writes are atomic (`atomic_write`): readers see the whole
file or nothing. On a local disk a file is written under a hidden temporary name in its own folder
(`.name.<random>.tmp`, which Parquet readers skip), fsync'ed and renamed into place; on object
stores (s3://, gs://) an object only appears when its upload completes, so a killed writer never
leaves a half-written file that looks finished.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from typing import Any, Callable, Iterable, Optional

from storage.config import StorageConfig
from storage.filesystems import absolute, fsspec_filesystem, is_local, pyarrow_filesystem


def safe_relative(name: str, what: str = "the output folder") -> str:
    """A normalised relative path that stays inside its root, or ValueError."""
    if not name or name.startswith(("/", "\\")) or "://" in name or "\x00" in name:
        raise ValueError(f"refusing {name!r}: names must be relative paths under {what}")
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm == "." or norm == ".." or norm.startswith("../"):
        raise ValueError(f"refusing {name!r}: it leaves {what}")
    return norm


def temporary_name(path: str) -> str:
    """A hidden sibling of `path` to write into before the rename: `.<name>.<random>.tmp`."""
    folder, leaf = os.path.split(path)
    return os.path.join(folder, f".{leaf}.{uuid.uuid4().hex[:12]}.tmp")


def is_temporary(name: str) -> bool:
    """True for the hidden temporary files `atomic_write` leaves when its process is killed."""
    leaf = name.rsplit("/", 1)[-1]
    return leaf.startswith(".") and leaf.endswith(".tmp")


def atomic_local_write(path: str, write: Callable[[str], None]) -> int:
    """Atomic write of a local file through `write(temporary_path)`; returns the size in bytes."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        return commit_local(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def commit_local(tmp: str, path: str) -> int:
    """fsync the finished temporary file `tmp`, then rename it to `path`; returns its size."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    size = os.path.getsize(tmp)
    os.replace(tmp, path)
    return size


def atomic_write(fs, path: str, data: bytes) -> None:
    """Write `data` to `path` on an fsspec filesystem so that readers see all of it or nothing."""
    if _fs_is_local(fs):

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                fh.write(data)

        atomic_local_write(path, write)
    else:  # object stores: an object appears whole when its upload completes
        fs.pipe_file(path, data)


def _fs_is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


class Folder:
    """A folder (local path or fsspec URL) and the files under it; see the module docstring.

    `config` carries the remote options (`StorageConfig`, or any config section that inherits it).
    Picklable: the filesystem is rebuilt on the other side (Ray workers).
    """

    def __init__(self, uri: str, config: Optional[StorageConfig] = None):
        self.url = absolute(uri).rstrip("/") or "/"
        self.config = config.storage() if config is not None else StorageConfig()
        self.fs, root = fsspec_filesystem(self.url, self.config)
        self.root = root.rstrip("/") or "/"
        self.local = is_local(self.url)

    def __reduce__(self):
        return (Folder, (self.url, self.config))

    def __repr__(self) -> str:
        return f"Folder({self.url!r})"

    # --- names
    def path(self, name: str) -> str:
        """Filesystem path of `name` (relative to the root)."""
        return f"{self.root}/{safe_relative(name, self.url)}"

    def full_url(self, name: str) -> str:
        """`name` as a URI users can open (with the protocol for remote stores)."""
        return f"{self.url}/{safe_relative(name, self.url)}"

    def child(self, name: str) -> "Folder":
        return Folder(self.full_url(name), self.config)

    def pyarrow(self) -> tuple[Any, str]:
        """(pyarrow filesystem, root path inside it), for Ray Train and pyarrow readers."""
        return pyarrow_filesystem(self.url, self.config)

    # --- listing and removing
    def makedirs(self, name: str = "") -> None:
        if self.local:
            os.makedirs(self.path(name) if name else self.root, exist_ok=True)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def list(self, folder: str, suffix: str = "", hidden: bool = False) -> list[str]:
        """Names (relative to the root) of the files directly in `folder`, sorted."""
        base = self.path(folder)
        try:
            entries = self.fs.ls(base, detail=False) if self.local else self.fs.ls(base, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            leaf = entry.rstrip("/").rsplit("/", 1)[-1]
            if leaf.endswith(suffix) and (hidden or not leaf.startswith(".")):
                names.append(f"{safe_relative(folder, self.url)}/{leaf}")
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

    # --- bytes, JSON, Arrow, Parquet
    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic write: readers see the whole file or nothing."""
        atomic_write(self.fs, self.path(name), data)

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def read_text(self, name: str) -> Optional[str]:
        """The file's text, or None when it does not exist."""
        try:
            return self.read_bytes(name).decode()
        except FileNotFoundError:
            return None

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=False).encode())

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_parquet(self, name: str, table, row_group_rows: int = 1024) -> int:
        """Write `table` as one Parquet file (atomically); returns its size in bytes."""
        sink = self.parquet_sink(name, table.schema, row_group_rows)
        try:
            sink.write(table)
        except BaseException:
            sink.abort()
            raise
        return sink.close()

    def parquet_sink(self, name: str, schema, row_group_rows: int = 1024):
        """A Parquet file written in pieces that appears (atomically) on `close()`."""
        from storage.parquet import ParquetSink

        return ParquetSink(self, name, schema, row_group_rows)

    def read_parquet(self, name: str, columns: Optional[list[str]] = None):
        import pyarrow.parquet as pq

        with self.fs.open(self.path(name), "rb") as fh:
            return pq.read_table(fh, columns=columns)

    def write_arrow(self, name: str, table) -> None:
        import pyarrow as pa

        buf = io.BytesIO()
        with pa.ipc.new_file(buf, table.schema) as writer:
            writer.write_table(table)
        self.write_bytes(name, buf.getvalue())

    def read_arrow(self, name: str):
        import pyarrow as pa

        return pa.ipc.open_file(pa.BufferReader(self.read_bytes(name))).read_all()

    # --- whole folders
    def upload(self, local_folder: str, name: str = "") -> None:
        """Copy a local folder's files (recursively) to `name` under the root, each file atomically
        (streamed: model files can be gigabytes)."""
        import shutil

        for dirpath, _, files in os.walk(local_folder):
            for leaf in sorted(files):
                source = os.path.join(dirpath, leaf)
                relative = os.path.relpath(source, local_folder).replace(os.sep, "/")
                target = self.path(f"{name}/{relative}" if name else relative)
                if self.local:
                    atomic_local_write(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
                else:  # an object appears whole when its (multipart) upload completes
                    self.fs.put_file(source, target)

    def download(self, name: str, local_path: str) -> bool:
        """Copy one file to a local path if it exists; True when copied."""
        try:
            data = self.read_bytes(name)
        except FileNotFoundError:
            return False
        os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
        with open(local_path, "wb") as fh:
            fh.write(data)
        return True


def _parent_and_name(uri: str) -> tuple[str, str]:
    full = absolute(uri)
    if "/" not in full.split("://", 1)[-1]:
        raise ValueError(f"{uri!r} names no file")
    parent, name = full.rsplit("/", 1)
    return parent or "/", name


def write_file(uri: str, data: bytes, config: Optional[StorageConfig] = None) -> None:
    """Write one file given by its full URI (local path or remote), atomically."""
    parent, name = _parent_and_name(uri)
    Folder(parent, config).write_bytes(name, data)


def read_file(uri: str, config: Optional[StorageConfig] = None) -> Optional[bytes]:
    """The bytes of one file given by its full URI; None when it does not exist."""
    parent, name = _parent_and_name(uri)
    try:
        return Folder(parent, config).read_bytes(name)
    except FileNotFoundError:
        return None
