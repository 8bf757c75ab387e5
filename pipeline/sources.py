"""Read URL lists: parquet, csv, tsv, json/jsonl (each optionally .gz); a file, a folder or a glob,
local or any fsspec URL.

Every reader yields `pyarrow.Table` batches in one normal form, whatever the input looked like:
`url` (string), `caption` (string), `caption_ok` (bool: the caption was a valid UTF-8 string),
`source_error` (string, null for a readable row) and the requested extra columns. Captions that are
missing, not strings, or not valid UTF-8 keep a printable stand-in (invalid bytes replaced by
U+FFFD) and `caption_ok = false`, so the filters can reject them with a reason instead of the
reader failing or dropping them.

Rows, and what a malformed one becomes: in csv/tsv/jsonl every non-blank line after the header is
one input row (blank lines are not rows). A line with the wrong number of fields, bad CSV quoting,
a JSON line that does not parse or is not an object, or a URL that is not valid UTF-8 stays a row,
with `source_error` naming the file, the line and the problem; the download phase rejects it as
`filter/malformed_row`, so it is counted like any other reject. In csv, a quoted field may span
lines (a caption with line breaks, as pandas and pyarrow read it): a line whose quote is still open
at its end is read together with the next lines until the quote closes, up to
`MAX_RECORD_LINES`; the row is numbered by its first line. If the quote does not close there, or
the joined lines are not one valid row, the first line alone is the row (malformed: bad quoting)
and reading goes on with the next line, so a stray quote cannot swallow the rest of the file.

Bad input as a whole is found before any download: a missing column, an empty list, a file that
cannot be opened or parsed at all (a parquet/JSON-array file that does not parse, a text file none
of whose lines is a valid row) raises `InputError` (a ValueError) naming the file, the column and
what to do.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import BLUR_BOXES, EXPECTED_HASH, DataConfig
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


def _read_only_columns(data: DataConfig) -> list[tuple[str, str]]:
    """(config key, column) of the input columns read for a check, not carried into the shards."""
    found = [("data.bbox_col", data.bbox_col)]
    if data.verify_hash is not None:
        found.append(("data.verify_hash.column", data.verify_hash.column))
    return [(key, col) for key, col in found if col is not None]


def _wanted(data: DataConfig) -> list[str]:
    wanted = [data.url_col, data.caption_col, *data.extra_cols]
    wanted += [col for _, col in _read_only_columns(data) if col not in wanted]
    return wanted


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
    for key, col in _read_only_columns(data):
        if col not in available:
            raise InputError(
                f"{key} {col!r} is not a column of {file.url} (columns: {', '.join(map(str, available))})")


def read_file(file: InputFile, data: DataConfig, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Normalised batches (see module doc) of one input file, in file order."""
    readers = {"parquet": _read_parquet, "csv": _read_delimited, "tsv": _read_delimited,
               "json": _read_json, "jsonl": _read_json}
    valid = malformed = 0
    first_problem = None
    try:
        for batch in readers[file.format](file, data, batch_rows):
            table = normalise(batch, data, file)
            errors = table.column("source_error")
            malformed += len(errors) - errors.null_count
            valid += errors.null_count
            if first_problem is None and errors.null_count < len(errors):
                first_problem = next(e for e in errors.to_pylist() if e is not None)
            yield table
        if valid == 0 and malformed:
            raise InputError(
                f"{file.url}: none of its {malformed} row(s) can be read as {file.format} ({first_problem}); "
                f"is it really a {file.format} file (compression, delimiter, data.columns)?")
    except InputError as exc:
        message = str(exc)
        raise InputError(message if file.url in message else f"{file.url}: {message}") from None
    except FileNotFoundError:
        raise InputError(f"{file.url} does not exist (listed from data.input {data.input!r})") from None
    except Exception as exc:  # noqa: BLE001 - any other parse error is an unreadable file
        raise InputError(
            f"{file.url} cannot be read as {file.format}"
            f"{' (' + file.compression + ')' if file.compression else ''}: {type(exc).__name__}: {exc}"
        ) from None


def _read_parquet(file: InputFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    """Parquet rows as they are (a null URL is a row: the download rejects it as `invalid_url`)."""
    with _open(file, data) as fh:
        source = io.BytesIO(fh.read()) if file.compression else fh
        pf = pq.ParquetFile(source)
        _check_columns(file, pf.schema_arrow.names, data)
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=_wanted(data)):
            table = pa.Table.from_batches([batch])
            yield table.append_column(_POSITION, pa.array(range(row, row + table.num_rows), pa.int64()))
            row += table.num_rows


# --- csv / tsv: read in blocks of whole lines; a malformed line becomes a reject, not an error

BLOCK_BYTES = 8 << 20  # bytes per block of lines (also the longest line accepted)


def _blocks(fh, block_bytes: Optional[int] = None) -> Iterator[tuple[int, bytes]]:
    """(number of the block's first line, block) with blocks cut after a newline; the last block
    may lack its final newline. Lines are separated by b"\n" only (a lone CR is data)."""
    block_bytes = block_bytes or BLOCK_BYTES
    line = 1
    rest = b""
    while True:
        chunk = fh.read(block_bytes)
        if not chunk:
            if rest:
                yield line, rest
            return
        rest += chunk
        cut = rest.rfind(b"\n")
        if cut < 0:
            if len(rest) > block_bytes:
                raise InputError(f"line {line} is longer than {block_bytes >> 20} MiB: not a URL list?")
            continue
        block, rest = rest[: cut + 1], rest[cut + 1:]
        yield line, block
        line += block.count(b"\n")


def _split_fields(line: bytes, fmt: str) -> list[bytes]:
    """The fields of one line (without its newline); csv.Error for bad quoting."""
    sep = b"\t" if fmt == "tsv" else b","
    if fmt == "tsv" or b'"' not in line:
        return line.split(sep)
    # Standard CSV quoting, strictly, one line at a time: an unterminated quote is an error on
    # this line instead of swallowing the next ones. Bytes survive as surrogate escapes.
    row = next(csv.reader([line.decode("utf-8", "surrogateescape")], strict=True))
    return [f.encode("utf-8", "surrogateescape") for f in row]


def _header_names(line: bytes, fmt: str) -> list[str]:
    line = line.rstrip(b"\r")
    try:
        fields = _split_fields(line, fmt)
    except csv.Error:
        fields = line.split(b"\t" if fmt == "tsv" else b",")
    names = [f.decode("utf-8", "replace").strip().strip('"') for f in fields]
    if names:
        names[0] = names[0].lstrip("\ufeff")  # a byte-order mark
    return names


def _read_delimited(file: InputFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    """csv (standard quoting) or tsv (no quoting: CC3M/CC12M captions hold bare quotes).

    A block of lines goes through pyarrow's parser when nothing in it can be ambiguous (no quote
    character, no blank line, no lone CR) and every line has the right number of fields; any other
    block is parsed line by line in Python, where a line with the wrong number of fields or bad
    quoting becomes a row whose `source_error` names the file and line. Blank lines are not rows.
    Everything is read as bytes: text is validated as UTF-8 in `normalise`.
    """
    fmt = file.format
    wanted = _wanted(data)
    with _open(file, data) as fh:
        blocks = _with_last(_blocks(fh))
        names = list(data.columns) if data.columns else None
        carried, carried_line = b"", 0  # lines of a quoted field still open at the last block's end
        for first_line, block, last in blocks:
            if names is None:
                cut = block.find(b"\n")
                header, block = (block, b"") if cut < 0 else (block[:cut], block[cut + 1:])
                names = _header_names(header, fmt)
                _check_columns(file, names, data)
                first_line += 1
                if not block:
                    continue
            elif first_line == 1:
                _check_columns(file, names, data)
            if carried:
                block, first_line, carried = carried + block, carried_line, b""
            table = _parse_block_fast(block, first_line, names, wanted, fmt)
            if table is None:
                table, rest = _parse_block_slowly(file, block, first_line, names, wanted, fmt, last)
                if rest is not None:
                    carried_line, carried = rest
            if table.num_rows:
                yield table


def _with_last(blocks: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes, bool]]:
    """(line, block, is the last block)."""
    previous = None
    for item in blocks:
        if previous is not None:
            yield (*previous, False)
        previous = item
    if previous is not None:
        yield (*previous, True)


def _parse_block_fast(block: bytes, first_line: int, names: list[str], wanted: list[str],
                      fmt: str) -> Optional[pa.Table]:
    """pyarrow's parser on a block where it cannot misread anything (no quotes, no lone CR, the
    right number of fields on every line, no blank line); None: use the slow path."""
    # (Blank lines need no search: pyarrow skips them, so the row count below tells.)
    if fmt == "csv" and b'"' in block:
        return None
    crs = block.count(b"\r")
    if crs and crs != block.count(b"\r\n"):
        return None
    lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
    try:
        # A line with the wrong number of fields raises (no invalid_row_handler: pyarrow would
        # decode the line to text for it, which fails, unraisably, on bytes that are not UTF-8).
        table = pacsv.read_csv(
            pa.py_buffer(block),
            read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 20),
            parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in wanted},
                                                 include_columns=wanted, strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, ValueError):
        return None
    if table.num_rows != lines:
        return None
    return table.append_column("source_error", pa.nulls(lines, pa.string())).append_column(
        _POSITION, pa.array(np.arange(first_line, first_line + lines, dtype=np.int64)))


MAX_RECORD_LINES = 256  # lines one csv row may span (a quoted field with line breaks)


def _parse_block_slowly(file: InputFile, block: bytes, first_line: int, names: list[str], wanted: list[str],
                        fmt: str, last: bool = True) -> tuple[pa.Table, Optional[tuple[int, bytes]]]:
    """Rows of a block, line by line; and, when the block ends inside a quoted field that may go on
    in the next block (not `last`), (number of its first line, its lines) to read with that block."""
    index = [names.index(c) for c in wanted]
    columns: list[list] = [[] for _ in wanted]
    errors: list[Optional[str]] = []
    positions: list[int] = []
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()
    offset = 0
    while offset < len(lines):
        raw = lines[offset]
        line = raw[:-1] if raw.endswith(b"\r") else raw
        number = first_line + offset
        offset += 1
        if not line:
            continue  # a blank line is not a row
        problem = None
        try:
            fields = _split_fields(line, fmt)
        except csv.Error as exc:
            fields, problem = None, f"bad quoting: {exc}"
            if fmt == "csv" and line.count(b'"') % 2:  # a quote still open at the end of the line
                joined = _open_quote_record(lines, offset - 1, len(names))
                if joined is None and not last and len(lines) - (offset - 1) < MAX_RECORD_LINES:
                    rest = b"\n".join(lines[offset - 1:]) + (b"\n" if block.endswith(b"\n") else b"")
                    return _slow_table(wanted, columns, errors, positions), (number, rest)
                if joined:
                    (fields, more_lines), problem = joined, None
                    offset += more_lines
        if fields is not None and len(fields) != len(names):
            problem = f"{len(fields)} field(s), expected {len(names)} ({', '.join(names)})"
        positions.append(number)
        if problem is None:
            errors.append(None)
            for col, i in zip(columns, index):
                col.append(fields[i])
            continue
        shown = line[:200].decode("utf-8", "replace")
        errors.append(f"{file.url} line {number}: {problem}: {shown!r}")
        for col in columns:
            col.append(None)
    return _slow_table(wanted, columns, errors, positions), None


def _open_quote_record(lines: list[bytes], start: int, fields: int) -> Union[tuple[list[bytes], int], bool, None]:
    """The csv row that starts at `lines[start]`, whose quoted field goes on over the next lines:
    (its fields, how many lines after the first it takes) when the lines up to the one that closes
    the quote (at most MAX_RECORD_LINES) read as one row of `fields` fields; False when they do not;
    None when the quote is still open after the last of `lines` (the row may go on in the next block)."""
    quotes = lines[start].count(b'"')
    end = start
    while quotes % 2:
        end += 1
        if end >= len(lines):
            return None
        if end - start >= MAX_RECORD_LINES:
            return False
        quotes += lines[end].count(b'"')
    record = b"\n".join(lines[start:end + 1])
    record = record[:-1] if record.endswith(b"\r") else record
    try:
        row = next(csv.reader([record.decode("utf-8", "surrogateescape")], strict=True))
    except csv.Error:
        return False
    if len(row) != fields:
        return False
    return [f.encode("utf-8", "surrogateescape") for f in row], end - start


def _slow_table(wanted: list[str], columns: list[list], errors: list[Optional[str]], positions: list[int]) -> pa.Table:
    arrays = {c: pa.array(col, pa.binary()) for c, col in zip(wanted, columns)}
    arrays["source_error"] = pa.array(errors, pa.string())
    arrays[_POSITION] = pa.array(positions, pa.int64())
    return pa.table(arrays)


# --- json / jsonl


def _read_json(file: InputFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    """JSON lines, or one JSON array of objects (a `.json` file may be either).

    JSON lines: a line that is not JSON, or not a JSON object, becomes a row whose `source_error`
    names the file and line; blank lines are not rows. A JSON array is one document: if it does not
    parse, the file is unreadable (InputError). Invalid UTF-8 is kept as surrogate escapes, so a
    caption with bad bytes is flagged like in a TSV file.
    """
    wanted = _wanted(data)
    checked = False
    rows: list[Any] = []
    errors: list[Optional[str]] = []
    positions: list[int] = []

    def flush() -> pa.Table:
        cols: dict[str, pa.Array] = {}
        for c in wanted:
            conv = _json_caption if c == data.caption_col else _json_cell
            cols[c] = pa.array([None if r is None else conv(r.get(c)) for r in rows], type=pa.binary())
        cols["source_error"] = pa.array(errors, pa.string())
        cols[_POSITION] = pa.array(positions, pa.int64())
        table = pa.table(cols)
        rows.clear(), errors.clear(), positions.clear()
        return table

    def add(value: Any, position: int, where: str) -> None:
        nonlocal checked
        if isinstance(value, dict):
            if not checked:
                _check_columns(file, list(value.keys()), data)
                checked = True
            rows.append(value)
            errors.append(None)
        else:
            rows.append(None)
            errors.append(f"{file.url} {where}: a JSON {type(value).__name__}, not an object: {str(value)[:200]!r}")
        positions.append(position)

    with _open(file, data) as fh:
        head = b""
        while True:
            ch = fh.read(1)
            if not ch or not ch.isspace():
                head = ch
                break
        if head == b"[":
            document = json.loads((head + fh.read()).decode("utf-8", "surrogateescape"))
            for i, value in enumerate(document):
                add(value, i, f"item {i}")
                if len(rows) >= batch_rows:
                    yield flush()
            if rows:
                yield flush()
            return
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1:
                raw = head + raw
            text = raw.decode("utf-8", "surrogateescape").strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                rows.append(None)
                errors.append(f"{file.url} line {line_no}: not JSON ({exc}): {text[:200]!r}")
                positions.append(line_no)
            else:
                add(value, line_no, f"line {line_no}")
            if len(rows) >= batch_rows:
                yield flush()
        if rows:
            yield flush()


_NOT_TEXT = b"\x00clipray-not-text\x00"
_POSITION = "__position"  # a reader's line (text formats) or row (parquet) number, for messages


def _text_bytes(value: str) -> bytes:
    """A str decoded with surrogateescape (or holding JSON-escaped lone surrogates) back to bytes;
    invalid UTF-8 stays invalid, so `normalise` flags it."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def _json_cell(value: Any) -> Optional[bytes]:
    if value is None:
        return None
    if isinstance(value, str):
        return _text_bytes(value)
    return json.dumps(value).encode()


def _json_caption(value: Any) -> Optional[bytes]:
    if value is None:
        return None
    if isinstance(value, str):
        return _text_bytes(value)
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


def normalise(table: pa.Table, data: DataConfig, file: Optional[InputFile] = None) -> pa.Table:
    """`url`, `caption`, `caption_ok`, `source_error` and the extra columns, from any reader's batch.

    `source_error` is null for a readable row; otherwise it says why the row cannot be used (a
    malformed line, a URL that is not valid UTF-8) and where, and the download rejects the row
    as `filter/malformed_row` without fetching anything.
    """
    url, url_ok = _as_text(table.column(data.url_col))
    caption, ok = _as_text(table.column(data.caption_col))
    if "source_error" in table.column_names:
        errors = table.column("source_error").combine_chunks()
    else:
        errors = pa.nulls(table.num_rows, pa.string())
    bad_url = pc.and_(pc.invert(pc.fill_null(url_ok, False)), url.is_valid())
    if pc.any(bad_url).as_py():
        problems = [f"the url is not valid UTF-8: {text[:200]!r}" if flag else None
                    for flag, text in zip(bad_url.to_pylist(), url.to_pylist())]
        errors = _with_problems(errors, problems, table, file)
    if data.bbox_col is not None:
        boxes, problems = _blur_boxes(table.column(data.bbox_col))
        if any(problems):
            problems = [p and f"data.bbox_col {data.bbox_col!r}: {p}" for p in problems]
            errors = _with_problems(errors, problems, table, file)
    columns = {"url": url, "caption": caption, "caption_ok": pc.fill_null(ok, False), "source_error": errors}
    if data.bbox_col is not None:
        columns[BLUR_BOXES] = boxes
    for col in data.extra_cols:
        values = table.column(col)
        if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
            values, _ = _as_text(values)
        columns[col] = values
    if data.verify_hash is not None:
        columns[EXPECTED_HASH] = _expected_hashes(table.column(data.verify_hash.column))
    return pa.table(columns)


def _with_problems(errors: pa.Array, problems: list[Optional[str]], table: pa.Table,
                   file: Optional[InputFile]) -> pa.Array:
    """`errors` with each row's problem (where it had none yet), naming the file and line/row."""
    unit = "row" if file is None or file.format == "parquet" else "line"
    positions = (table.column(_POSITION).to_pylist() if _POSITION in table.column_names
                 else list(range(table.num_rows)))
    name = file.url if file is not None else "input"
    return pa.array([e if e is not None or p is None else f"{name} {unit} {pos}: {p}"
                     for e, p, pos in zip(errors.to_pylist(), problems, positions)], pa.string())


BOXES_TYPE = pa.list_(pa.list_(pa.float64()))


def _blur_boxes(column: pa.ChunkedArray) -> tuple[pa.Array, list[Optional[str]]]:
    """The bbox column as lists of [x_min, y_min, x_max, y_max] (null: nothing to blur), and per
    row what is wrong with a value that is not such a list (parquet/JSON lists, or JSON text in
    csv/tsv cells, as img2dataset reads them)."""
    boxes: list = []
    problems: list[Optional[str]] = []
    for value in column.to_pylist():
        if isinstance(value, (bytes, str)):
            try:
                value = json.loads(value) if value.strip() else None
            except (ValueError, UnicodeDecodeError):
                boxes.append(None)
                problems.append(f"not a JSON list of boxes: {value[:100]!r}")
                continue
        ok = value is None or (isinstance(value, list) and all(
            isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in b)
            for b in value))
        boxes.append([[float(v) for v in b] for b in value] if ok and value is not None else None)
        problems.append(None if ok else f"not a list of [x_min, y_min, x_max, y_max] boxes: {str(value)[:100]}")
    return pa.array(boxes, BOXES_TYPE), problems


def _expected_hashes(column: pa.ChunkedArray) -> pa.Array:
    """The verify-hash column as lower-case hex strings (null where absent or not text)."""
    typ = column.type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ)
            or pa.types.is_large_binary(typ)):
        return pa.nulls(len(column), pa.string())
    text, ok = _as_text(column)
    text = pc.if_else(pc.fill_null(ok, False), text, pa.scalar(None, pa.string()))
    return pc.utf8_lower(pc.utf8_trim_whitespace(text))
