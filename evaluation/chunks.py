"""An opened evaluation data set (`EvalDataset`) and how its images are read: in chunks (a
Parquet row group of image bytes, or a slice of image paths), by the local loop or inside Ray tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import StorageConfig, open_file

PATH_CHUNK_ROWS = 512  # rows per read unit when images are files


@dataclass
class ImageChunk:
    """A unit of image reading: a Parquet row group (file + row_group), a run of samples of a tar
    shard (file + tar_skip: the samples before it in the shard) or a slice of image paths (neither)."""

    row_start: int  # row_id of the first row
    num_rows: int
    file: Optional[str] = None
    row_group: Optional[int] = None
    tar_skip: Optional[int] = None

    def as_item(self) -> dict:
        """A row of plain ints and strings for a Ray dataset of chunk descriptions (-1: not set)."""
        return {
            "row_start": self.row_start,
            "num_rows": self.num_rows,
            "file": self.file,
            "row_group": -1 if self.row_group is None else self.row_group,
            "tar_skip": -1 if self.tar_skip is None else self.tar_skip,
        }


@dataclass
class EvalDataset:
    name: str  # for the results JSON
    source: str
    format: str  # imagefolder | table | shards | wds
    meta: pa.Table  # row_id, key, [image (path/URL)], [label], [captions (list<string>)]
    chunks: list[ImageChunk]
    image_in_parquet: bool  # True: bytes in `image_column` of parquet files; False: meta.image paths
    image_column: str
    storage: StorageConfig = field(default_factory=StorageConfig)  # how to reach remote images
    classes: Optional[list[str]] = None  # imagefolder: the folder names, sorted
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped at open time
    image_in_tar: bool = False  # True: images in the tar shards of `chunks` (CLIP_benchmark wds)
    classnames: Optional[list[str]] = None  # names the set ships (wds classnames.txt), label order
    templates: Optional[list[str]] = None  # prompts the set ships (wds zeroshot_classification_templates.txt)

    @property
    def num_rows(self) -> int:
        return self.meta.num_rows

    def iter_image_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches of {"row_id" int64, "image" (bytes or path)} in row order, for the local loop."""
        for chunk in self.chunks:
            rows = read_chunk(chunk, self.image_in_parquet, self.image_column, self.meta, self.storage)
            for start in range(0, len(rows["row_id"]), batch_size):
                yield {k: v[start : start + batch_size] for k, v in rows.items()}

    def to_ray(self):
        """A Ray Dataset of {"row_id", "image"} rows: paths as data, or Parquet row groups read
        inside Ray tasks (image bytes never pass through the driver)."""
        import ray

        from ray_compat import data_context

        data_context()
        if not self.image_in_parquet and not self.image_in_tar:
            table = self.meta.select(["row_id", "image"])
            return ray.data.from_arrow([table.slice(c.row_start, c.num_rows) for c in self.chunks])
        items = [c.as_item() for c in self.chunks]
        reader = ChunkReader(self.image_column, self.storage)
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            reader, batch_size=1, batch_format="numpy"
        )

    def head(self, n: int) -> "EvalDataset":
        """The first n usable rows (eval.max_samples)."""
        if n >= self.num_rows:
            return self
        meta = self.meta.slice(0, n)
        end = int(meta.column("row_id")[n - 1].as_py()) + 1  # raw rows to read
        chunks = [
            ImageChunk(c.row_start, min(c.num_rows, end - c.row_start), c.file, c.row_group, c.tar_skip)
            for c in self.chunks
            if c.row_start < end
        ]
        return EvalDataset(
            self.name,
            self.source,
            self.format,
            meta,
            chunks,
            self.image_in_parquet,
            self.image_column,
            self.storage,
            self.classes,
            dict(self.rejected),
            self.image_in_tar,
            self.classnames,
            self.templates,
        )


class ChunkReader:
    """Ray map_batches function: chunk descriptions (Parquet row groups, tar shards) -> rows of
    (row_id, image bytes)."""

    def __init__(self, image_column: str, storage: StorageConfig):
        self.image_column = image_column
        self.storage = storage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns = zip(batch["row_start"], batch["num_rows"], batch["file"], batch["row_group"], batch["tar_skip"])
        parts = [
            read_chunk(
                ImageChunk(int(start), int(n), str(f), None if g < 0 else int(g), None if k < 0 else int(k)),
                True,
                self.image_column,
                None,
                self.storage,
            )
            for start, n, f, g, k in columns
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in ("row_id", "image")}


def read_chunk(
    chunk: ImageChunk,
    image_in_parquet: bool,
    image_column: str,
    meta: Optional[pa.Table],
    storage: Optional[StorageConfig] = None,
) -> dict[str, np.ndarray]:
    """{"row_id": [n] int64, "image": [n] object} for one chunk (bytes from Parquet or a tar shard, or paths)."""
    if chunk.tar_skip is not None:
        from evaluation.wds import read_tar_images

        return read_tar_images(chunk.file, chunk.row_start, chunk.num_rows, chunk.tar_skip, storage)
    row_ids = np.arange(chunk.row_start, chunk.row_start + chunk.num_rows, dtype=np.int64)
    images = np.empty(chunk.num_rows, dtype=object)
    if image_in_parquet:
        with open_file(chunk.file, "rb", storage) as fh:
            column = pq.ParquetFile(fh).read_row_group(chunk.row_group, columns=[image_column]).column(0)
        images[:] = column.slice(0, chunk.num_rows).to_pylist()
    else:
        images[:] = meta.column("image").slice(chunk.row_start, chunk.num_rows).to_pylist()
    return {"row_id": row_ids, "image": images}


def path_chunks(n: int) -> list[ImageChunk]:
    """Read units of PATH_CHUNK_ROWS rows for n images named by path."""
    return [ImageChunk(s, min(PATH_CHUNK_ROWS, n - s)) for s in range(0, n, PATH_CHUNK_ROWS)]
