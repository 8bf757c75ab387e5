"""Read URL lists: parquet, csv, tsv, json/jsonl (each optionally .gz, .bz2, .zst, .xz); a file, a
folder or a glob, local or any fsspec URL.

`list_input_files(data)` finds the files (`files.py`); `read_file(file, data)` yields one file's
rows as `pyarrow.Table` batches in the normal form of `normal_form.py` (`url`, `caption`,
`caption_ok`, `source_error`, the extra and check columns), whatever the format. One module per
format makes the raw batches: `parquet.py`, `delimited.py` (csv/tsv), `json.py` (json/jsonl),
`webdataset.py` (WebDataset `.tar` shards: their images are used without a download).

A row that cannot be read (a malformed line, a URL that is not valid UTF-8) is not an error: it
stays a row with `source_error` set and the download rejects it as `filter/malformed_row`. Bad
input as a whole is found before any download: a missing column, an empty list, a file that cannot
be opened or parsed at all (a parquet/JSON-array file that does not parse, a text file none of
whose lines is a valid row) raises `InputError` (a ValueError) naming the file, the column and what
to do.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from pipeline.config import DataConfig
from pipeline.sources.delimited import read_delimited
from pipeline.sources.files import FORMATS, InputError, InputFile, list_input_files
from pipeline.sources.json import read_json
from pipeline.sources.normal_form import normalise
from pipeline.sources.parquet import read_parquet
from pipeline.sources.webdataset import read_webdataset

BATCH_ROWS = 65_536  # rows per batch of the parquet and json readers (csv/tsv: per 8 MiB block)
READERS = {
    "parquet": read_parquet,
    "csv": read_delimited,
    "tsv": read_delimited,
    "json": read_json,
    "jsonl": read_json,
    "webdataset": read_webdataset,
}


def read_file(file: InputFile, data: DataConfig, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Normalised batches (see `normal_form.py`) of one input file, in file order."""
    valid = malformed = 0
    first_problem = None
    try:
        for batch in READERS[file.format](file, data, batch_rows):
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
                f"is it really a {file.format} file (compression, delimiter, data.columns)?"
            )
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


__all__ = ["BATCH_ROWS", "FORMATS", "READERS", "InputError", "InputFile", "list_input_files", "normalise", "read_file"]
