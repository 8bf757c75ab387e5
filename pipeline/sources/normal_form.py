"""The one form every reader's batches are turned into, whatever the input looked like.

A normalised batch is a `pyarrow.Table` with `url` (string), `caption` (string), `caption_ok`
(bool: the caption was a valid UTF-8 string), `source_error` (string, null for a readable row), the
requested `data.extra_cols`, and, when those checks are on, `expected_hash` (`data.verify_hash`,
lower-case hex) and `blur_boxes` (`data.bbox_col`, lists of [x_min, y_min, x_max, y_max]).

Captions that are missing, not strings, or not valid UTF-8 keep a printable stand-in (invalid bytes
replaced by U+FFFD) and `caption_ok = false`, so the filters reject them with a reason instead of
the reader failing or dropping them. A URL that is not valid UTF-8, or a bbox value that is not a
list of boxes, makes the row unreadable: its `source_error` names the file and the line or row.

Readers hand `normalise` their raw columns (text formats as binary, so UTF-8 is validated here
once), plus `source_error` for the rows they could not parse and `POSITION`, each row's line (text
formats) or row (parquet) number for those messages.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import BLUR_BOXES, EXPECTED_HASH, LOCAL_IMAGE, DataConfig, column_copy
from pipeline.sources.files import InputError, InputFile

POSITION = "__position"  # a reader's line (text formats) or row (parquet) number, for messages
# Prefix of a binary caption cell that holds a value that was not text (a JSON number, list, ...):
# the reader keeps its printed form, `normalise` shows it and flags the caption.
NOT_TEXT = b"\x00clipray-not-text\x00"
BOXES_TYPE = pa.list_(pa.list_(pa.float64()))


# --- which input columns are read


def _read_only_columns(data: DataConfig) -> list[tuple[str, str]]:
    """(config key, column) of the input columns read for a check, not carried into the shards."""
    found = [("data.bbox_col", data.bbox_col)]
    found += [("data.filters.columns", rule.column) for rule in data.filters.columns]
    if data.verify_hash is not None:
        found.append(("data.verify_hash.column", data.verify_hash.column))
    return [(key, col) for key, col in found if col is not None]


def wanted_columns(data: DataConfig) -> list[str]:
    """The input columns a reader must hand to `normalise`, in this order, each once."""
    wanted = [data.url_col, data.caption_col, *data.extra_cols]
    wanted += [col for _, col in _read_only_columns(data) if col not in wanted]
    return wanted


def check_columns(file: InputFile, available: list[str], data: DataConfig) -> None:
    """InputError naming the config key when a configured column is not among `available`."""
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
            raise InputError(f"{key} {col!r} is not a column of {file.url} (columns: {', '.join(map(str, available))})")


# --- text


def _decode_cell(value: Any) -> tuple[Optional[str], bool]:
    """(printable text, was valid text) for one caption cell."""
    if value is None:
        return None, False
    if isinstance(value, bytes):
        if value.startswith(NOT_TEXT):
            return value[len(NOT_TEXT) :].decode("utf-8", errors="replace"), False
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
            if not pc.any(pc.starts_with(col, NOT_TEXT.decode())).as_py():
                return col, col.is_valid()
        except (pa.ArrowInvalid, UnicodeDecodeError):
            pass
    texts, oks = zip(*(_decode_cell(v) for v in column.to_pylist())) if len(column) else ((), ())
    return pa.array(texts, type=pa.string()), pa.array(oks, type=pa.bool_())


# --- the normal form


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
        problems = [
            f"the url is not valid UTF-8: {text[:200]!r}" if flag else None
            for flag, text in zip(bad_url.to_pylist(), url.to_pylist())
        ]
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
    if LOCAL_IMAGE in table.column_names:
        columns[LOCAL_IMAGE] = table.column(LOCAL_IMAGE)
    for name in dict.fromkeys(rule.column for rule in data.filters.columns):
        values = table.column(name)
        if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
            values, _ = _as_text(values)
        columns[column_copy(name)] = values
    return pa.table(columns)


def _with_problems(
    errors: pa.Array, problems: list[Optional[str]], table: pa.Table, file: Optional[InputFile]
) -> pa.Array:
    """`errors` with each row's problem (where it had none yet), naming the file and line/row."""
    unit = "row" if file is None or file.format == "parquet" else "line"
    positions = table.column(POSITION).to_pylist() if POSITION in table.column_names else list(range(table.num_rows))
    name = file.url if file is not None else "input"
    return pa.array(
        [
            e if e is not None or p is None else f"{name} {unit} {pos}: {p}"
            for e, p, pos in zip(errors.to_pylist(), problems, positions)
        ],
        pa.string(),
    )


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
        ok = value is None or (
            isinstance(value, list)
            and all(
                isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in b)
                for b in value
            )
        )
        boxes.append([[float(v) for v in b] for b in value] if ok and value is not None else None)
        problems.append(None if ok else f"not a list of [x_min, y_min, x_max, y_max] boxes: {str(value)[:100]}")
    return pa.array(boxes, BOXES_TYPE), problems


def _expected_hashes(column: pa.ChunkedArray) -> pa.Array:
    """The verify-hash column as lower-case hex strings (null where absent or not text)."""
    typ = column.type
    if not (
        pa.types.is_string(typ)
        or pa.types.is_large_string(typ)
        or pa.types.is_binary(typ)
        or pa.types.is_large_binary(typ)
    ):
        return pa.nulls(len(column), pa.string())
    text, ok = _as_text(column)
    text = pc.if_else(pc.fill_null(ok, False), text, pa.scalar(None, pa.string()))
    return pc.utf8_lower(pc.utf8_trim_whitespace(text))
