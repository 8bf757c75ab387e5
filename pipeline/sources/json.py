"""Read `.jsonl` files (one JSON object per line) and `.json` files (JSON lines, or one JSON array
of objects) into raw batches for `normal_form.normalise`.

Every non-blank line of JSON lines is one input row; a line that is not JSON, or not a JSON object,
stays a row whose `source_error` names the file and line. A JSON array is one document: every item
is a row (an item that is not an object is a malformed row), and if the document does not parse
the file is unreadable. Cells come out as bytes: strings as their UTF-8 (invalid bytes kept, so
`normalise` flags them like in a TSV file), other values as their JSON text; a caption that is not
a string is marked with `NOT_TEXT` so the caption filters reject it.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

import pyarrow as pa

from pipeline.config import DataConfig
from pipeline.sources.files import InputFile, open_input
from pipeline.sources.normal_form import NOT_TEXT, POSITION, check_columns, wanted_columns


def read_json(file: InputFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    """Raw batches of at most `batch_rows` rows, columns `wanted_columns(data)` (binary),
    `source_error` and `POSITION` (line number, or item index in a JSON array)."""
    wanted = wanted_columns(data)
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
        cols[POSITION] = pa.array(positions, pa.int64())
        table = pa.table(cols)
        rows.clear(), errors.clear(), positions.clear()
        return table

    def add(value: Any, position: int, where: str) -> None:
        nonlocal checked
        if isinstance(value, dict):
            if not checked:
                check_columns(file, list(value.keys()), data)
                checked = True
            rows.append(value)
            errors.append(None)
        else:
            rows.append(None)
            errors.append(f"{file.url} {where}: a JSON {type(value).__name__}, not an object: {str(value)[:200]!r}")
        positions.append(position)

    with open_input(file, data) as fh:
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
    return NOT_TEXT + json.dumps(value).encode()
