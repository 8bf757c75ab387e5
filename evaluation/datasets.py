"""Evaluation data sets: what `eval.dataset` / `eval.train_dataset` point at, read the same way
by the local loop and by Ray.

Accepted (local paths or fsspec URLs such as `s3://bucket/prefix`):

- an **ImageFolder tree**: `root/<class>/<image>` (ImageNet's val layout after the usual
  `valprep` sort is one). Classes are the sorted folder names; 1000 WordNet-id folders
  (`n01440764`, ...) get the CLIP paper's ImageNet class names unless `eval.classnames` is given.
- a **table**: `.csv`, `.tsv` or `.parquet` file(s) (a file, a folder of them, or a glob) with an
  image column (`eval.image_col`: encoded bytes, or a path/URL relative to the table's folder) and
  a label column (`eval.label_col`) and/or a caption column (`eval.caption_col`). A caption column
  may hold a list of captions; rows that repeat an image path are several captions of one image.
- **pipeline shards**: a pipeline output folder (`{data.output}`, read from `shards/*.parquet`)
  or a folder of shard files; the image is the `jpg` column, extra columns such as the demo's
  `color` / `shape` can be the label (`eval.label_col`).

Everything except image bytes is read into the driver at open time (`EvalDataset.meta`, one row per
image with a `row_id`); image bytes stay in their files and are read in chunks (a Parquet row group)
by whoever embeds them, so a cluster never funnels images through the driver. Image paths are data:
the embedding step opens them. Rows without a label / caption are dropped at open time and counted;
undecodable images are counted by the embedding step.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TABLE_EXTENSIONS = (".csv", ".tsv", ".parquet", ".pq")
PARQUET_EXTENSIONS = (".parquet", ".pq")
# When eval.image_col keeps its default ('jpg', the pipeline's) and a table has no such column.
IMAGE_COL_FALLBACKS = ("image", "image_path", "filepath", "path", "file", "img")
_WNID = re.compile(r"^n\d{8}$")
PATH_CHUNK_ROWS = 512  # rows per read unit when images are files


@dataclass
class ImageChunk:
    """A unit of image reading: a Parquet row group (file + row_group) or a slice of image paths."""

    row_start: int  # row_id of the first row
    num_rows: int
    file: Optional[str] = None
    row_group: Optional[int] = None


@dataclass
class EvalDataset:
    name: str  # for the results JSON
    source: str
    format: str  # imagefolder | table | shards
    meta: pa.Table  # row_id, key, [image (path/URL)], [label], [captions (list<string>)]
    chunks: list[ImageChunk]
    image_in_parquet: bool  # True: bytes in `image_column` of parquet files; False: meta.image paths
    image_column: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    classes: Optional[list[str]] = None  # imagefolder: the folder names, sorted
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped at open time

    @property
    def num_rows(self) -> int:
        return self.meta.num_rows

    def iter_image_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches of {"row_id" int64, "image" (bytes or path)} in row order, for the local loop."""
        for chunk in self.chunks:
            rows = read_chunk(chunk, self.image_in_parquet, self.image_column, self.meta, self.storage_options)
            for start in range(0, len(rows["row_id"]), batch_size):
                yield {k: v[start:start + batch_size] for k, v in rows.items()}

    def to_ray(self):
        """A Ray Dataset of {"row_id", "image"} rows: paths as data, or Parquet row groups read
        inside Ray tasks (image bytes never pass through the driver)."""
        import ray

        from ray_compat import data_context

        data_context()
        if not self.image_in_parquet:
            table = self.meta.select(["row_id", "image"])
            return ray.data.from_arrow([table.slice(c.row_start, c.num_rows) for c in self.chunks])
        items = [{"row_start": c.row_start, "num_rows": c.num_rows, "file": c.file, "row_group": c.row_group}
                 for c in self.chunks]
        reader = ParquetChunkReader(self.image_column, self.storage_options)
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            reader, batch_size=1, batch_format="numpy")

    def head(self, n: int) -> "EvalDataset":
        """The first n usable rows (eval.max_samples)."""
        if n >= self.num_rows:
            return self
        meta = self.meta.slice(0, n)
        end = int(meta.column("row_id")[n - 1].as_py()) + 1  # raw rows to read
        chunks = [ImageChunk(c.row_start, min(c.num_rows, end - c.row_start), c.file, c.row_group)
                  for c in self.chunks if c.row_start < end]
        return EvalDataset(self.name, self.source, self.format, meta, chunks, self.image_in_parquet,
                           self.image_column, self.storage_options, self.classes, dict(self.rejected))


class ParquetChunkReader:
    """Ray map_batches function: row-group descriptions -> rows of (row_id, image bytes)."""

    def __init__(self, image_column: str, storage_options: dict[str, Any]):
        self.image_column = image_column
        self.storage_options = storage_options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = [
            read_chunk(ImageChunk(int(start), int(n), str(f), int(g)), True, self.image_column, None,
                       self.storage_options)
            for start, n, f, g in zip(batch["row_start"], batch["num_rows"], batch["file"], batch["row_group"])
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in ("row_id", "image")}


def read_chunk(chunk: ImageChunk, image_in_parquet: bool, image_column: str, meta: Optional[pa.Table],
               storage_options: dict[str, Any]) -> dict[str, np.ndarray]:
    """{"row_id": [n] int64, "image": [n] object} for one chunk (bytes from Parquet, or paths)."""
    row_ids = np.arange(chunk.row_start, chunk.row_start + chunk.num_rows, dtype=np.int64)
    images = np.empty(chunk.num_rows, dtype=object)
    if image_in_parquet:
        with fsspec.open(chunk.file, "rb", **_options_for(chunk.file, storage_options)) as fh:
            column = pq.ParquetFile(fh).read_row_group(chunk.row_group, columns=[image_column]).column(0)
        images[:] = column.slice(0, chunk.num_rows).to_pylist()
    else:
        images[:] = meta.column("image").slice(chunk.row_start, chunk.num_rows).to_pylist()
    return {"row_id": row_ids, "image": images}


def _options_for(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    return storage_options if "://" in url and not url.startswith("file://") else {}


def _full(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path inside `fs` as a URL that fsspec.open understands anywhere."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def open_dataset(spec: str, *, image_col: str = "jpg", label_col: Optional[str] = "label",
                 caption_col: Optional[str] = None, need_labels: bool = False, need_captions: bool = False,
                 name: Optional[str] = None, storage_options: Optional[dict[str, Any]] = None,
                 what: str = "eval.dataset") -> EvalDataset:
    """Open an ImageFolder tree, a CSV/Parquet table or pipeline shards (see the module docstring).

    need_labels / need_captions: fail early (naming the key and the columns found) when the
    source has no such column.
    """
    options = dict(storage_options or {})
    fs, path = fsspec.core.url_to_fs(spec, **_options_for(spec, options))
    path = path.rstrip("/") or "/"
    args = (fs, image_col, label_col, caption_col, need_labels, need_captions, name, options, what)
    if any(ch in path for ch in "*?["):
        files = sorted(fs.glob(path))
        if not files:
            raise FileNotFoundError(f"{what} {spec}: the glob matches no file")
        return _open_table(spec, [_full(fs, f) for f in files], *args, fmt="table")
    if not fs.exists(path):
        raise FileNotFoundError(f"{what} {spec} does not exist")
    if fs.isfile(path):
        if not path.lower().endswith(TABLE_EXTENSIONS):
            raise ValueError(f"{what} {spec}: a file must be a table ({', '.join(TABLE_EXTENSIONS)}); "
                             "for images give their folder (an ImageFolder tree)")
        return _open_table(spec, [_full(fs, path)], *args, fmt="table")
    shards = posixpath.join(path, "shards")
    if fs.isdir(shards):
        files = sorted(f for f in fs.ls(shards, detail=False) if f.lower().endswith(PARQUET_EXTENSIONS))
        if not files:
            raise FileNotFoundError(f"{what} {spec}: {shards} holds no .parquet shard")
        return _open_table(spec, [_full(fs, f) for f in files], *args, fmt="shards")
    entries = fs.ls(path, detail=True)
    tables = sorted(e["name"] for e in entries
                    if e["type"] == "file" and e["name"].lower().endswith(TABLE_EXTENSIONS))
    if tables:
        parquet_only = all(t.lower().endswith(PARQUET_EXTENSIONS) for t in tables)
        return _open_table(spec, [_full(fs, f) for f in tables], *args, fmt="shards" if parquet_only else "table")
    dirs = sorted(e["name"] for e in entries if e["type"] == "directory")
    if dirs:
        if need_captions:
            raise ValueError(f"{what} {spec} is an ImageFolder tree (class folders), which has no captions; "
                             "retrieval needs a table or shards with a caption column")
        return _open_imagefolder(spec, path, fs, dirs, name, options, what)
    raise ValueError(f"{what} {spec}: no shards/, no table files ({', '.join(TABLE_EXTENSIONS)}) and no class "
                     "folders; give an ImageFolder tree, a CSV/Parquet table or a pipeline output folder")


def _open_imagefolder(spec, path, fs, dirs, name, options, what) -> EvalDataset:
    classes = [posixpath.basename(d.rstrip("/")) for d in dirs]
    paths, labels = [], []
    for cls, d in zip(classes, dirs):
        files = sorted(f for f in fs.find(d) if f.lower().endswith(IMAGE_EXTENSIONS))
        paths.extend(_full(fs, f) for f in files)
        labels.extend([cls] * len(files))
    if not paths:
        raise ValueError(f"{what} {spec}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    root = path.rstrip("/") + "/"
    keys = [p.split(root, 1)[-1] for p in paths]
    meta = pa.table({"row_id": np.arange(len(paths), dtype=np.int64), "key": keys, "image": paths, "label": labels})
    return EvalDataset(name or _default_name(spec), spec, "imagefolder", meta, _path_chunks(len(paths)),
                       image_in_parquet=False, image_column="image", storage_options=options, classes=classes)


def _path_chunks(n: int) -> list[ImageChunk]:
    return [ImageChunk(s, min(PATH_CHUNK_ROWS, n - s)) for s in range(0, n, PATH_CHUNK_ROWS)]


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _read_table_meta(url: str, options: dict[str, Any], image_col: str) -> tuple[pa.Table, pa.Schema, list[int]]:
    """(all columns but image bytes, the file's schema, row counts of its row groups)."""
    with fsspec.open(url, "rb", **_options_for(url, options)) as fh:
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


def _open_table(spec, files, fs, image_col, label_col, caption_col, need_labels, need_captions, name,
                options, what, fmt) -> EvalDataset:
    read = [_read_table_meta(url, options, image_col) for url in files]
    columns = read[0][1].names
    for url, (_, schema, _) in zip(files, read):
        if schema.names != columns:
            raise ValueError(f"{what} {spec}: {url} has columns {schema.names}, unlike {files[0]} ({columns})")
    if image_col not in columns:
        fallback = [c for c in IMAGE_COL_FALLBACKS if c in columns]
        if image_col != "jpg" or not fallback:
            raise ValueError(f"{what} {spec}: eval.image_col '{image_col}' is not a column "
                             f"(columns: {', '.join(columns)}); set eval.image_col")
        image_col = fallback[0]
    if need_labels and (label_col is None or label_col not in columns):
        raise ValueError(f"{what} {spec}: eval.label_col '{label_col}' is not a column (columns: {', '.join(columns)}); "
                         "set eval.label_col to the column holding the class")
    if need_captions and (caption_col is None or caption_col not in columns):
        raise ValueError(f"{what} {spec}: eval.caption_col '{caption_col}' is not a column "
                         f"(columns: {', '.join(columns)}); set eval.caption_col")
    image_type = read[0][1].field(image_col).type
    image_in_parquet = _is_binary(image_type)
    if not image_in_parquet and not (pa.types.is_string(image_type) or pa.types.is_large_string(image_type)):
        raise ValueError(f"{what} {spec}: eval.image_col '{image_col}' holds {image_type}; "
                         "it must hold encoded image bytes or image paths/URLs")

    rejected = {"missing_label": 0, "missing_caption": 0, "missing_image": 0}
    parts, chunks, row = [], [], 0
    for url, (table, _, row_groups) in zip(files, read):
        n = table.num_rows
        cols: dict[str, Any] = {"row_id": np.arange(row, row + n, dtype=np.int64), "key": _keys(table, url)}
        keep = np.ones(n, dtype=bool)
        if not image_in_parquet:
            base = posixpath.dirname(url)
            cols["image"] = [_resolve(p, base) for p in table.column(image_col).to_pylist()]
            missing = np.array([p is None for p in cols["image"]], dtype=bool)
            rejected["missing_image"] += int(missing.sum())
            keep &= ~missing
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
        chunks = _path_chunks(meta.num_rows)
    rejected = {k: v for k, v in rejected.items() if v}
    if meta.num_rows == 0:
        raise ValueError(f"{what} {spec}: no usable rows ({rejected or 'the table is empty'})")
    return EvalDataset(name or _default_name(spec), spec, fmt, meta, chunks, image_in_parquet, image_col,
                       options, None, rejected)


def _keys(table: pa.Table, url: str) -> list[str]:
    if "key" in table.column_names:
        return [str(k) for k in table.column("key").to_pylist()]
    stem = posixpath.basename(url)
    return [f"{stem}:{i}" for i in range(table.num_rows)]


def _resolve(path: Optional[str], base: str) -> Optional[str]:
    if path is None or path == "":
        return None
    if "://" in path or path.startswith("/"):
        return path
    return posixpath.join(base, path)


def _as_caption_lists(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return column
    values = column.cast(pa.string()).to_pylist()
    return pa.chunked_array([pa.array([None if v is None or v == "" else [v] for v in values],
                                      type=pa.list_(pa.string()))])


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
    return grouped.set_column(grouped.column_names.index("captions"), "captions",
                              pa.array(captions, type=pa.list_(pa.string())))


def _default_name(spec: str) -> str:
    base = posixpath.basename(spec.rstrip("/")) or spec
    return re.sub(r"\.(parquet|pq|csv|tsv)$", "", base)


# --- class names --------------------------------------------------------------------------------

def resolve_classes(labels: Sequence[Any], *, folder_classes: Optional[Sequence[str]] = None,
                    classnames: Optional[Sequence[str]] = None,
                    need_names: bool = True) -> tuple[list[str], np.ndarray, str]:
    """(class names, label index per row, where the names came from).

    - ImageFolder (folder_classes): the label index is the folder's position in sorted order; the
      names are `classnames` (one per folder) or the folder names (1000 WordNet ids: ImageNet's).
    - tables: integer labels index `classnames`; string labels are looked up in `classnames`;
      without `classnames`, the classes are the sorted distinct labels.
    need_names: zero-shot needs real names (integer labels without a class-name file are an error).
    """
    labels = list(labels)
    if folder_classes is not None:
        position = {c: i for i, c in enumerate(folder_classes)}
        idx = np.asarray([position[str(v)] for v in labels], dtype=np.int64)
        if classnames is not None:
            if len(classnames) != len(folder_classes):
                raise ValueError(f"eval.classnames has {len(classnames)} names but the ImageFolder tree has "
                                 f"{len(folder_classes)} class folders; give one name per folder, in sorted folder order")
            return list(classnames), idx, "eval.classnames (one per folder, sorted folder order)"
        if len(folder_classes) == 1000 and all(_WNID.match(c) for c in folder_classes):
            from evaluation.templates import load_classnames

            return load_classnames("imagenet"), idx, "ImageNet class names (1000 WordNet-id folders)"
        return list(folder_classes), idx, "folder names"
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels)
    if classnames is not None:
        if ints:
            idx = np.asarray(labels, dtype=np.int64)
            bad = idx[(idx < 0) | (idx >= len(classnames))]
            if bad.size:
                raise ValueError(f"label {int(bad[0])} is out of range for the {len(classnames)} class names")
            return list(classnames), idx, "eval.classnames (integer labels index it)"
        position = {n: i for i, n in reversed(list(enumerate(classnames)))}  # first wins on repeats
        unknown = sorted({str(v) for v in labels} - set(position))
        if unknown:
            raise ValueError(f"{len(unknown)} labels are not class names: {unknown[:10]}; "
                             f"the class names are {list(classnames)[:10]}{' ...' if len(classnames) > 10 else ''}")
        return list(classnames), np.asarray([position[str(v)] for v in labels], dtype=np.int64), "eval.classnames"
    if ints and need_names:
        raise ValueError("the labels are integers, so zero-shot has no class names to prompt with: "
                         "give eval.classnames (a built-in name such as imagenet, or a file with one name per line)")
    names = sorted({str(v) for v in labels}, key=(lambda s: int(s)) if ints else None)
    position = {n: i for i, n in enumerate(names)}
    return names, np.asarray([position[str(v)] for v in labels], dtype=np.int64), "sorted distinct labels"
