"""Read `.csv` (standard quoting) and `.tsv` (no quoting: CC3M/CC12M captions hold bare quotes)
files, with a header or with `data.columns`, into raw batches for `normal_form.normalise`.

Every non-blank line after the header is one input row (blank lines are not rows). A line with the
wrong number of fields, or bad csv quoting, stays a row with `source_error` naming the file, the
line and the problem; the download rejects it as `filter/malformed_row`, so it is counted like any
other reject. In csv a quoted field may span lines (a caption with line breaks, as pandas and
pyarrow read it): a line whose quote is still open at its end is read together with the next lines
until the quote closes, up to `MAX_RECORD_LINES`; the row is numbered by its first line. If the
quote does not close there, or the joined lines are not one valid row, the first line alone is the
row (malformed: bad quoting) and reading goes on with the next line, so a stray quote cannot
swallow the rest of the file.

The file is read in blocks of whole lines (`BLOCK_BYTES`, also the longest line accepted). A block
in which nothing can be ambiguous goes through pyarrow's parser; any other block is parsed line by
line in Python. Both give the same rows. Cells come out as bytes: `normalise` validates UTF-8.
"""

from __future__ import annotations

import csv
from typing import Iterator, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.config import DataConfig
from pipeline.sources.files import InputError, InputFile, open_input
from pipeline.sources.normal_form import POSITION, check_columns, wanted_columns

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
        block, rest = rest[: cut + 1], rest[cut + 1 :]
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


def read_delimited(file: InputFile, data: DataConfig, batch_rows: int) -> Iterator[pa.Table]:
    """Raw batches, one per block of lines, columns `wanted_columns(data)` (binary),
    `source_error` and `POSITION` (the row's first line number). Batches are cut by bytes
    (`BLOCK_BYTES`), not rows: `batch_rows` is accepted for the readers' common signature only.

    A block goes through pyarrow's parser when nothing in it can be ambiguous (no quote character
    in csv, no blank line, no lone CR) and every line has the right number of fields; any other
    block is parsed line by line in Python (`_parse_block_slowly`).
    """
    fmt = file.format
    wanted = wanted_columns(data)
    with open_input(file, data) as fh:
        blocks = _with_last(_blocks(fh))
        names = list(data.columns) if data.columns else None
        carried, carried_line = b"", 0  # lines of a quoted field still open at the last block's end
        for first_line, block, last in blocks:
            if names is None:
                cut = block.find(b"\n")
                header, block = (block, b"") if cut < 0 else (block[:cut], block[cut + 1 :])
                names = _header_names(header, fmt)
                check_columns(file, names, data)
                first_line += 1
                if not block:
                    continue
            elif first_line == 1:
                check_columns(file, names, data)
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


def _parse_block_fast(
    block: bytes, first_line: int, names: list[str], wanted: list[str], fmt: str
) -> Optional[pa.Table]:
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
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.binary() for c in wanted}, include_columns=wanted, strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, ValueError):
        return None
    if table.num_rows != lines:
        return None
    return table.append_column("source_error", pa.nulls(lines, pa.string())).append_column(
        POSITION, pa.array(np.arange(first_line, first_line + lines, dtype=np.int64))
    )


MAX_RECORD_LINES = 256  # lines one csv row may span (a quoted field with line breaks)


def _parse_block_slowly(
    file: InputFile, block: bytes, first_line: int, names: list[str], wanted: list[str], fmt: str, last: bool = True
) -> tuple[pa.Table, Optional[tuple[int, bytes]]]:
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
                    rest = b"\n".join(lines[offset - 1 :]) + (b"\n" if block.endswith(b"\n") else b"")
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
    record = b"\n".join(lines[start : end + 1])
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
    arrays[POSITION] = pa.array(positions, pa.int64())
    return pa.table(arrays)
