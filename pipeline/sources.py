"""Read URL lists: parquet, csv, tsv, json/jsonl (each optionally .gz); a file, a folder or a glob,
local or any fsspec URL.

Every reader yields `pyarrow.Table` batches in one normal form, whatever the input looked like:
`url` (string), `caption` (string), `caption_ok` (bool: the caption was a valid UTF-8 string) and
the requested extra columns. Captions that are missing, not strings, or not valid UTF-8 keep a
printable stand-in (invalid bytes replaced by U+FFFD) and `caption_ok = false`, so the filters can
reject them with a reason instead of the reader failing or dropping them.

Bad input is found before any download: a missing column, an empty list or an unreadable file
raises `InputError` (a ValueError) naming the file, the column and what to do.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.storage import filesystem, protocol_of

FORMATS = ("parquet", "csv", "tsv", "json", "jsonl")
_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl",
               ".ndjson": "jsonl"}
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": "xz"}
BATCH_ROWS = 65_536


class InputError(ValueError):
    """The URL list cannot be read as configured; raised before any download starts."""


@dataclass(frozen=True)
class InputFile:
    url: str  # full path or URL (with protocol for remote stores)
    format: str
    compression: Optional[str]


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
        fs, path = filesystem(spec, data.fsspec_options())
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
    if not files:
        hint = f" (skipped files without a known extension: {', '.join(skipped[:5])})" if skipped else ""
        raise InputError(
            f"data.input {spec!r} holds no URL list{hint}; expected {', '.join(FORMATS)} files "
            "(optionally .gz), or set data.input_format"
        )
    return files


# --- reading one file


def _open(file: InputFile, data: DataConfig):
    return fsspec.open(file.url, "rb", compression=file.compression, **(
        data.fsspec_options() if protocol_of(file.url) != "file" else {}))


def _wanted(data: DataConfig) -> list[str]:
    return [data.url_col, data.caption_col, *data.extra_cols]


def _check_columns(file: InputFile, available: list[str], data: DataConfig) -> None:
    for key, col in (("data.url_col", data.url_col), ("data.caption_col", data.caption_col)):
        if col not in available:
            raise InputError(
                f"{key} {col!r} is not a column of {file.url} (columns: {', '.join(map(str, available))}); "
                f"set {key} to one of them"
            )
    missing = [c for c in data.extra_cols if c not in available]
    if missing:
        raise InputError(
            f"data.extra_cols {missing} are not columns of {file.url} (columns: {', '.join(map(str, available))})"
        )


def read_file(file: InputFile, data: DataConfig, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Normalised batches (see module doc) of one input file, in file order."""
    readers = {"parquet": _read_parquet, "csv": _read_delimited, "tsv": _read_delimited,
               "json": _read_json, "jsonl": _read_json}
    try:
        for batch in readers[file.format](file, data, batch_rows):
            yield normalise(batch, data)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{file.url} does not exist (listed from data.input {data.input!r})") from None
    except Exception as exc:  # noqa: BLE001 - any parse error is an unreadable file
        raise InputError(
            f"{file.url} cannot be read as {file.format}"
            f"{' (' + file.compression + ')' if file.compression else ''}: {type(exc).__name__}: {exc}"
        ) from None


def _read_parquet(file: InputFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    with _open(file, data) as fh:
        source = io.BytesIO(fh.read()) if file.compression else fh
        pf = pq.ParquetFile(source)
        _check_columns(file, pf.schema_arrow.names, data)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=_wanted(data)):
            yield pa.Table.from_batches([batch])


def _header(file: InputFile, data: DataConfig, delimiter: str) -> list[str]:
    with _open(file, data) as fh:
        line = fh.readline()
    text = line.decode("utf-8", errors="replace").rstrip("\r\n")
    return [c.strip().strip('"') for c in text.split(delimiter)]


def _read_delimited(file: InputFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    delimiter = "\t" if file.format == "tsv" else ","
    if data.columns:
        names = list(data.columns)
        read_options = pacsv.ReadOptions(column_names=names, block_size=8 << 20)
    else:
        names = _header(file, data, delimiter)
        read_options = pacsv.ReadOptions(block_size=8 << 20)
    _check_columns(file, names, data)
    wanted = _wanted(data)
    # Everything is read as bytes: captions are validated as UTF-8 row by row in `normalise`,
    # and a CSV has no types to keep anyway. Tab-separated files are not quoted (CC3M/CC12M
    # captions contain bare quotes); comma-separated files use standard CSV quoting.
    parse_options = pacsv.ParseOptions(delimiter=delimiter, quote_char=False if file.format == "tsv" else '"')
    convert_options = pacsv.ConvertOptions(
        column_types={c: pa.binary() for c in wanted}, include_columns=wanted,
        strings_can_be_null=False, quoted_strings_can_be_null=False,
    )
    with _open(file, data) as fh:
        reader = pacsv.open_csv(fh, read_options=read_options, parse_options=parse_options,
                                convert_options=convert_options)
        for batch in reader:
            if batch.num_rows:
                yield pa.Table.from_batches([batch])


def _read_json(file: InputFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    """JSON lines, or one JSON array of objects (a `.json` file may be either)."""
    wanted = _wanted(data)
    checked = False

    def rows_to_table(rows: list[Any]) -> pa.Table:
        nonlocal checked
        if not checked and rows:
            if not isinstance(rows[0], dict):
                raise InputError(f"{file.url}: expected JSON objects, got {type(rows[0]).__name__}")
            _check_columns(file, list(rows[0].keys()), data)
            checked = True
        cols: dict[str, list] = {c: [] for c in wanted}
        for r in rows:
            if not isinstance(r, dict):
                raise InputError(f"{file.url}: expected JSON objects, got {type(r).__name__}")
            for c in wanted:
                cols[c].append(r.get(c))
        # Values keep their JSON type (a number caption stays a number until `normalise`).
        return pa.table({c: pa.array([_json_cell(v) for v in vals], type=pa.string()) if c != data.caption_col
                         else pa.array([_json_caption(v) for v in vals], type=pa.binary())
                         for c, vals in cols.items()}) if rows else pa.table({})

    with _open(file, data) as fh:
        stream = io.TextIOWrapper(fh, encoding="utf-8", errors="strict")
        first = ""
        while True:
            ch = stream.read(1)
            if not ch or not ch.isspace():
                first = ch
                break
        if first == "[":
            rows = json.loads(first + stream.read())
            for i in range(0, len(rows), batch_rows):
                yield rows_to_table(rows[i:i + batch_rows])
            return
        buffer: list[Any] = []
        pending = first
        for line_no, line in enumerate(stream, start=1):
            line = pending + line
            pending = ""
            if not line.strip():
                continue
            try:
                buffer.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{file.url} line {line_no}: not JSON ({exc}); fix or remove the line") from None
            if len(buffer) >= batch_rows:
                yield rows_to_table(buffer)
                buffer = []
        if pending.strip():
            buffer.append(json.loads(pending))
        if buffer:
            yield rows_to_table(buffer)


_NOT_TEXT = b"\x00clipray-not-text\x00"


def _json_cell(value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def _json_caption(value: Any) -> Optional[bytes]:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8", errors="surrogatepass")
    return _NOT_TEXT + json.dumps(value).encode()


# --- the normal form


def _decode_cell(value: Any) -> tuple[Optional[str], bool]:
    """(printable text, was valid text) for one caption cell."""
    if value is None:
        return None, False
    if isinstance(value, bytes):
        if value.startswith(_NOT_TEXT):
            return value[len(_NOT_TEXT):].decode("utf-8", errors="replace"), False
        try:
            return value.decode("utf-8"), True
        except UnicodeDecodeError:
            return value.decode("utf-8", errors="replace"), False
    if isinstance(value, str):
        return value, True
    return str(value), False


def _as_text(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """(string column, ok column) from any column type."""
    typ = column.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        col = column.cast(pa.string())
        return col, col.is_valid()
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        try:
            col = column.cast(pa.string())  # validates UTF-8 for the whole column at C speed
            if not pc.any(pc.starts_with(col, _NOT_TEXT.decode())).as_py():
                return col, col.is_valid()
        except (pa.ArrowInvalid, UnicodeDecodeError):
            pass
    texts, oks = zip(*(_decode_cell(v) for v in column.to_pylist())) if len(column) else ((), ())
    return pa.array(texts, type=pa.string()), pa.array(oks, type=pa.bool_())


def normalise(table: pa.Table, data: DataConfig) -> pa.Table:
    """`url`, `caption`, `caption_ok` and the extra columns, from any reader's batch."""
    url, _ = _as_text(table.column(data.url_col))
    caption, ok = _as_text(table.column(data.caption_col))
    columns = {"url": url, "caption": caption, "caption_ok": pc.fill_null(ok, False)}
    for col in data.extra_cols:
        values = table.column(col)
        if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
            values, _ = _as_text(values)
        columns[col] = values
    return pa.table(columns)
