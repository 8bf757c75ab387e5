"""Eval data sets held in tables: CSV/TSV/Parquet files with an image column (encoded bytes, or
paths resolved and checked by `evaluation.image_paths`) and label / caption columns; pipeline shards
are Parquet tables of this kind.

Everything but image bytes is read at open time into `EvalDataset.meta`; rows without a usable
image path, label or caption are dropped there and counted by reason.
"""

from __future__ import annotations

import logging
import posixpath
import re
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from evaluation.chunks import EvalDataset, ImageChunk, path_chunks
from evaluation.image_paths import HOW_TO_ALLOW, UNSAFE_IMAGE_PATH, ImagePathResolver
from storage import StorageConfig, open_file

log = logging.getLogger(__name__)

TABLE_EXTENSIONS = (".csv", ".tsv", ".parquet", ".pq")
PARQUET_EXTENSIONS = (".parquet", ".pq")
# When eval.image_col keeps its default ('jpg', the pipeline's) and a table has no such column.
IMAGE_COL_FALLBACKS = ("image", "image_path", "filepath", "path", "file", "img")


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _read_table_meta(url: str, storage: StorageConfig, image_col: str) -> tuple[pa.Table, pa.Schema, list[int]]:
    """(all columns but image bytes, the file's schema, row counts of its row groups)."""
    with open_file(url, "rb", storage) as fh:
        if url.lower().endswith(PARQUET_EXTENSIONS):
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
            keep = [c for c in schema.names if not (c == image_col and _is_binary(schema.field(c).type))]
            table = pf.read(columns=keep)
            groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
            return table, schema, groups
        delimiter = "\t" if url.lower().endswith(".tsv") else ","
        table = pacsv.read_csv(fh, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True))
        return table, table.schema, [table.num_rows]


def open_table(
    spec: str,
    files: list[str],
    *,
    image_col: str,
    label_col: Optional[str],
    caption_col: Optional[str],
    need_labels: bool,
    need_captions: bool,
    name: Optional[str],
    storage: StorageConfig,
    what: str,
    fmt: str,
    image_root: Optional[str] = None,
    allow_external_image_paths: bool = False,
) -> EvalDataset:
    """An EvalDataset over table files (all with the same columns); `fmt` "table" or "shards".

    Image paths are resolved by `ImagePathResolver` (image_root, allow_external_image_paths); rows
    whose path is missing or unsafe are dropped and counted with their reason.
    """
    read = [_read_table_meta(url, storage, image_col) for url in files]
    columns = read[0][1].names
    for url, (_, schema, _) in zip(files, read):
        if schema.names != columns:
            raise ValueError(f"{what} {spec}: {url} has columns {schema.names}, unlike {files[0]} ({columns})")
    if image_col not in columns:
        fallback = [c for c in IMAGE_COL_FALLBACKS if c in columns]
        if image_col != "jpg" or not fallback:
            raise ValueError(
                f"{what} {spec}: eval.image_col '{image_col}' is not a column "
                f"(columns: {', '.join(columns)}); set eval.image_col"
            )
        image_col = fallback[0]
    if need_labels and (label_col is None or label_col not in columns):
        raise ValueError(
            f"{what} {spec}: eval.label_col '{label_col}' is not a column (columns: {', '.join(columns)}); "
            "set eval.label_col to the column holding the class"
        )
    if need_captions and (caption_col is None or caption_col not in columns):
        raise ValueError(
            f"{what} {spec}: eval.caption_col '{caption_col}' is not a column "
            f"(columns: {', '.join(columns)}); set eval.caption_col"
        )
    image_type = read[0][1].field(image_col).type
    image_in_parquet = _is_binary(image_type)
    if not image_in_parquet and not (pa.types.is_string(image_type) or pa.types.is_large_string(image_type)):
        raise ValueError(
            f"{what} {spec}: eval.image_col '{image_col}' holds {image_type}; "
            "it must hold encoded image bytes or image paths/URLs"
        )

    rejected = {"missing_label": 0, "missing_caption": 0, "missing_image": 0, UNSAFE_IMAGE_PATH: 0}
    unsafe_examples: list[str] = []
    parts, chunks, row = [], [], 0
    for url, (table, _, row_groups) in zip(files, read):
        n = table.num_rows
        cols: dict[str, Any] = {"row_id": np.arange(row, row + n, dtype=np.int64), "key": _keys(table, url)}
        keep = np.ones(n, dtype=bool)
        if not image_in_parquet:
            resolver = ImagePathResolver(posixpath.dirname(url), image_root, allow_external_image_paths)
            resolved = [resolver.resolve(p) for p in table.column(image_col).to_pylist()]
            cols["image"] = [path for path, _, _ in resolved]
            for _, reason, detail in resolved:
                if reason:
                    rejected[reason] += 1
                if reason == UNSAFE_IMAGE_PATH and len(unsafe_examples) < 3:
                    unsafe_examples.append(detail)
            keep &= np.array([path is not None for path in cols["image"]], dtype=bool)
        if label_col is not None and label_col in columns:
            cols["label"] = table.column(label_col)
            if need_labels:
                missing = np.asarray(table.column(label_col).is_null().to_numpy(zero_copy_only=False), dtype=bool)
                rejected["missing_label"] += int((missing & keep).sum())
                keep &= ~missing
        if caption_col is not None and caption_col in columns:
            cols["captions"] = _as_caption_lists(table.column(caption_col))
            if need_captions:
                lengths = pc.fill_null(pc.list_value_length(cols["captions"]), 0).to_numpy(zero_copy_only=False)
                missing = np.asarray(lengths) == 0
                rejected["missing_caption"] += int((missing & keep).sum())
                keep &= ~missing
        if image_in_parquet:  # dropped rows are read with their row group and ignored
            start = row
            for g, count in enumerate(row_groups):
                chunks.append(ImageChunk(start, count, url, g))
                start += count
        parts.append(pa.table(cols).filter(pa.array(keep)))
        row += n
    meta = pa.concat_tables(parts)
    if not image_in_parquet:
        if "captions" in meta.column_names:
            meta = _group_captions_by_path(meta)
        meta = meta.set_column(0, "row_id", pa.array(np.arange(meta.num_rows, dtype=np.int64)))
        chunks = path_chunks(meta.num_rows)
    rejected = {k: v for k, v in rejected.items() if v}
    unsafe = ""
    if UNSAFE_IMAGE_PATH in rejected:
        unsafe = (
            f"{rejected[UNSAFE_IMAGE_PATH]} rows dropped as {UNSAFE_IMAGE_PATH}, their image path lies "
            f"outside the image root (e.g. {'; '.join(unsafe_examples)}); to read them, {HOW_TO_ALLOW}"
        )
    if meta.num_rows == 0:
        raise ValueError(
            f"{what} {spec}: no usable rows ({rejected or 'the table is empty'})" + (f"; {unsafe}" if unsafe else "")
        )
    if unsafe:
        log.warning("%s %s: %s", what, spec, unsafe)
    return EvalDataset(
        name or default_name(spec), spec, fmt, meta, chunks, image_in_parquet, image_col, storage, None, rejected
    )


def _keys(table: pa.Table, url: str) -> list[str]:
    if "key" in table.column_names:
        return [str(k) for k in table.column("key").to_pylist()]
    stem = posixpath.basename(url)
    return [f"{stem}:{i}" for i in range(table.num_rows)]


def _as_caption_lists(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return column
    values = column.cast(pa.string()).to_pylist()
    return pa.chunked_array(
        [pa.array([None if v is None or v == "" else [v] for v in values], type=pa.list_(pa.string()))]
    )


def _group_captions_by_path(meta: pa.Table) -> pa.Table:
    """Rows sharing an image path become one image with all their captions (first-seen order)."""
    paths = meta.column("image").to_pylist()
    if len(set(paths)) == len(paths):
        return meta
    first: dict[str, int] = {}
    captions: list[list[str]] = []
    keep: list[int] = []
    for i, (p, caps) in enumerate(zip(paths, meta.column("captions").to_pylist())):
        if p in first:
            captions[first[p]].extend(caps or [])
        else:
            first[p] = len(keep)
            keep.append(i)
            captions.append(list(caps or []))
    grouped = meta.take(pa.array(keep))
    return grouped.set_column(
        grouped.column_names.index("captions"), "captions", pa.array(captions, type=pa.list_(pa.string()))
    )


def default_name(spec: str) -> str:
    """The data set's name for the results JSON: the file or folder name without a table extension."""
    base = posixpath.basename(spec.rstrip("/")) or spec
    return re.sub(r"\.(parquet|pq|csv|tsv)$", "", base)
