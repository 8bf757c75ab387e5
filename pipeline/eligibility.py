"""Which staged input rows would be downloaded: the one rule the (url, caption) dedup and the
download share.

A row is eligible when it is readable (no `source_error`), its caption passes the caption
filters, and it has a non-empty URL. Otherwise it is rejected from the input alone, without a
request, for the first of these that fails:

- `filter/malformed_row`: the reader could not read the row (the detail is its `source_error`);
- the caption filters' reason (`filter/caption_empty`, `caption_not_text`, `caption_too_short`, ...);
- `filter/column:<name>`: a `data.filters.columns` rule on an input column (`column_filters.py`);
- `download/invalid_url`: the URL is null, empty or only whitespace (and the row holds no image of
  its own: WebDataset input brings its images, `LOCAL_IMAGE`, and needs no URL).

`dedup.pair_index` lists exactly the eligible rows, and `download.ShardDownloader` fetches exactly
the eligible rows that the pair dedup did not mark as repeats, so a row the dedup never saw is
never fetched, and an ineligible row keeps its own reason instead of becoming a duplicate.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from pipeline.config import LOCAL_IMAGE
from pipeline.filters import RowFilters
from pipeline.reasons import DOWNLOAD, FILTER, Rejection


def row_rejection(
    url: Optional[str],
    caption: Optional[str],
    caption_ok: bool,
    source_error: Optional[str],
    filters: RowFilters,
    column_rejection: Optional[Rejection] = None,
    local_image: bool = False,
) -> Optional[Rejection]:
    """Why this staged row is not downloaded, or None when it would be. `column_rejection`: the
    row's `data.filters.columns` verdict (`ColumnFilters.rejections`)."""
    if source_error is not None:
        return Rejection(FILTER, "malformed_row", source_error)
    rejection = filters.caption(caption, caption_ok)
    if rejection is not None:
        return rejection
    if column_rejection is not None:
        return column_rejection
    if not local_image and (not url or not url.strip()):
        return Rejection(DOWNLOAD, "invalid_url", "empty URL")
    return None


def table_rejections(table: pa.Table, filters: RowFilters) -> list[Optional[Rejection]]:
    """`row_rejection` of every row of a staged input table (columns `url`, `caption`,
    `caption_ok` and, when the reader found malformed rows, `source_error`), in row order."""
    urls = table.column("url").to_pylist()
    captions = table.column("caption").to_pylist()
    oks = table.column("caption_ok").to_pylist()
    errors = (
        table.column("source_error").to_pylist() if "source_error" in table.column_names else [None] * table.num_rows
    )
    columns = filters.columns.rejections(table) if filters.columns is not None else [None] * table.num_rows
    local = has_local_image(table)
    return [
        row_rejection(url, caption, bool(ok), error, filters, column, has_image)
        for url, caption, ok, error, column, has_image in zip(urls, captions, oks, errors, columns, local)
    ]


def has_local_image(table: pa.Table) -> list[bool]:
    """Per row: the staged input holds the image itself (WebDataset input), so nothing is fetched."""
    if LOCAL_IMAGE not in table.column_names:
        return [False] * table.num_rows
    return table.column(LOCAL_IMAGE).is_valid().to_pylist()
