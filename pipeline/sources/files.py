"""Which files `data.input` names (a file, a folder searched recursively, or a glob; local or any
fsspec URL), what format and compression each one has (from its extension or `data.input_format`),
and how to open one as a stream of bytes with the compression undone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import fsspec

from pipeline.config import DataConfig
from storage import fsspec_filesystem, fsspec_options, protocol_of

FORMATS = ("parquet", "csv", "tsv", "json", "jsonl", "webdataset")
_EXTENSIONS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".tar": "webdataset",
}
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": "xz"}


class InputError(ValueError):
    """The URL list cannot be read as configured; raised before any download starts."""


@dataclass(frozen=True)
class InputFile:
    url: str  # full path or URL (with protocol for remote stores)
    format: str  # one of FORMATS
    compression: Optional[str]  # fsspec's name ("gzip", "bz2", "zstd", "xz"), None: stored as is


def _split_ext(path: str) -> tuple[Optional[str], Optional[str]]:
    """(format, compression) from a file name: `a.tsv.gz` -> ('tsv', 'gzip')."""
    name = path.rsplit("/", 1)[-1].lower()
    compression = None
    for ext, comp in _COMPRESSIONS.items():
        if name.endswith(ext):
            compression, name = comp, name[: -len(ext)]
            break
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext):
            return fmt, compression
    return None, compression


def list_input_files(data: DataConfig) -> list[InputFile]:
    """The input files of `data.input` (a file, a folder searched recursively, or a glob), sorted."""
    if not data.input:
        raise InputError("data.input is not set: give a URL list file, a folder or a glob (local or s3://...)")
    spec = data.input
    try:
        fs, path = fsspec_filesystem(spec, data)
    except Exception as exc:  # noqa: BLE001 - e.g. an unknown protocol
        raise InputError(f"data.input {spec!r}: cannot open its filesystem: {exc}") from None
    prefix = "" if protocol_of(spec) == "file" else f"{protocol_of(spec)}://"
    try:
        if any(ch in path for ch in "*?["):
            paths = fs.glob(path)
        elif fs.isdir(path):
            paths = fs.find(path)
        elif fs.exists(path):
            paths = [path]
        else:
            raise InputError(f"data.input {spec!r} does not exist")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - permissions, bad credentials, ...
        raise InputError(f"data.input {spec!r}: cannot list it: {type(exc).__name__}: {exc}") from None
    files = []
    skipped = []
    for p in sorted(paths):
        leaf = p.rstrip("/").rsplit("/", 1)[-1]
        if leaf.startswith((".", "_")) or fs.isdir(p):
            continue
        fmt, compression = _split_ext(p)
        if data.input_format is not None:
            fmt = data.input_format
        if fmt is None:
            skipped.append(leaf)
            continue
        url = p if not prefix or p.startswith(prefix) else prefix + p
        files.append(InputFile(url=url, format=fmt, compression=compression))
    if data.input_format is None and any(f.format == "webdataset" for f in files):
        # img2dataset writes a metadata .parquet and a _stats.json beside each tar: the tars are the data.
        files = [f for f in files if f.format == "webdataset"]
    if not files:
        hint = f" (skipped files without a known extension: {', '.join(skipped[:5])})" if skipped else ""
        raise InputError(
            f"data.input {spec!r} holds no URL list{hint}; expected {', '.join(FORMATS[:-1])} files "
            "(optionally .gz) or WebDataset .tar shards, or set data.input_format"
        )
    return files


def open_input(file: InputFile, data: DataConfig):
    """`file` opened for reading bytes, decompressed on the fly (a context manager). A compressed
    stream reads forward only: seeking in it means inflating again from the start."""
    return fsspec.open(file.url, "rb", compression=file.compression, **fsspec_options(file.url, data))
