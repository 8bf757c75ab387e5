"""WebDataset tar shards in the training ingest: their sample counts and read pieces (for the plan)
and their rows (for the reader). The format's rules (keys, extensions, braces) are
`storage.webdataset`'s.

Counts: img2dataset's `{n}_stats.json` or open_clip's `sizes.json` where present; otherwise the
tar's member headers are read once. What a header walk learns is cached as
`{cache}/{blake2(filesystem, uri, size, mtime)}.json` = {"uri", "size", "mtime_ns", "samples",
"offsets"} (`offsets[i]`: the byte position of sample i's first member header; `default_count_cache()`:
`$XDG_CACHE_HOME/clipray/webdataset-counts`, else `~/.cache/...`), so a rerun, a resume or a
sweep's trials do not read the shards again; a changed shard (size or mtime) gets a new entry.

Pieces: a tar is read in pieces of `TAR_PIECE_SAMPLES` samples (the plan's "row groups",
`tar_pieces`), like a Parquet file's row groups, so the preprocessing actors share a tar's work and
the first batch comes after one piece, not one tar. A piece after the first starts at its first
sample's offset: the reader reads the piece's byte range (one seek or one range request) and never
the samples before it. Where the offsets cost nothing extra the tar is pieced: a local tar (its
headers walked once, seeking past the data) or a remote one counted here
(the count's walk records them); a remote tar with a metadata count is one piece (indexing it would
cost a range request per member or a read of the whole tar). The pieces are a pure function of the
count and the filesystem, never of what the cache holds, so the per-pass order and the data
position do not depend on it; the same rows as Parquet shards with row groups of
`TAR_PIECE_SAMPLES` rows give the same order.

Rows: a piece's samples are read in order. A sample without an image or a caption keeps its place
with a problem code, and a shard that ends before its count is padded with `truncated` rows, so the
row indices of the stream (the data position) are the plan's whatever the shard holds; the
Rebatcher drops and counts them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

from storage.webdataset import index_samples, metadata_counts, read_samples

log = logging.getLogger(__name__)

# Samples per read piece of a tar. Reading a tar costs the same in pieces of 32 to 512 samples (a
# seek and a read each), so the size is set by the rest: a shuffle window (`train.shuffle_rows`)
# overshoots by less than a piece, a piece's images are what one actor holds, and on S3 a piece is
# one range request of 128 x 30-100 kB; 128 = the row groups of benchmarks/ingest.py's Parquet.
TAR_PIECE_SAMPLES = 128
# Read buffer of a tar stream: pyarrow's S3 stream sends a range request per read() unbuffered,
# and the walker reads each 512-byte header on its own.
STREAM_BUFFER = 1 << 20


def default_count_cache() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "clipray", "webdataset-counts")


def tar_pieces(samples: int, pieced: bool) -> tuple[int, ...]:
    """Samples per read piece of a tar of `samples` (the Shard's row_groups); () = one piece."""
    if not pieced or samples <= TAR_PIECE_SAMPLES:
        return ()
    full, rest = divmod(samples, TAR_PIECE_SAMPLES)
    return (TAR_PIECE_SAMPLES,) * full + ((rest,) if rest else ())


def _is_local(fs: Any) -> bool:
    import pyarrow.fs as pafs

    return fs is None or isinstance(fs, pafs.LocalFileSystem)


def _read_text(fs: Any, path: str) -> Optional[str]:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read().decode("utf-8", errors="replace")


class TarIndex:
    """Sample offsets of tars: from the cache entry, else one header walk (written to the cache)."""

    def __init__(self, fs: Any, cache: Optional[str], what: str = "train.data"):
        import pyarrow.fs as pafs

        self.fs = fs if fs is not None else pafs.LocalFileSystem()
        self.cache, self.what = cache, what
        self.local = _is_local(fs)

    def _entry(self, path: str, info: Any) -> Optional[Path]:
        if not self.cache:
            return None
        stamp = f"{self.fs.type_name}\0{path}\0{info.size}\0{info.mtime_ns}"
        return Path(self.cache, hashlib.blake2b(stamp.encode(), digest_size=16).hexdigest() + ".json")

    def cached(self, path: str) -> Optional[list[int]]:
        entry = self._entry(path, self.fs.get_file_info(path))
        if entry is None or not entry.is_file():
            return None
        try:
            record = json.loads(entry.read_text())
            offsets = [int(o) for o in record["offsets"]]
            if len(offsets) != int(record["samples"]):
                return None
            return offsets
        except (ValueError, KeyError, TypeError, OSError):
            return None  # a damaged or older entry (counts without offsets): walk again

    def offsets(self, path: str) -> list[int]:
        """The byte offset of each sample of tar `path` (cached; else its headers walked once)."""
        found = self.cached(path)
        if found is not None:
            return found
        info = self.fs.get_file_info(path)
        opened = (
            self.fs.open_input_file(path) if self.local else self.fs.open_input_stream(path, buffer_size=STREAM_BUFFER)
        )
        with opened as fh:
            try:
                offsets = index_samples(fh, path, seekable=self.local)
            except ValueError as exc:
                raise ValueError(f"{self.what}: {exc}") from None
        entry = self._entry(path, info)
        if entry is not None:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".{os.getpid()}.tmp")
            record = {"uri": path, "size": info.size, "mtime_ns": info.mtime_ns}
            tmp.write_text(json.dumps({**record, "samples": len(offsets), "offsets": offsets}))
            os.replace(tmp, entry)
        return offsets


def tar_counts(
    fs: Any, paths: Sequence[str], *, cache: Optional[str], what: str = "train.data", threads: int = 16
) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{tar path: (samples, samples per read piece)} for `paths` on pyarrow filesystem `fs` (see
    the module doc). Raises ValueError naming a path that is not a tar at all."""
    known = metadata_counts(lambda p: _read_text(fs, p), list(paths))
    index = TarIndex(fs, cache, what)
    out = {p: (n, tar_pieces(n, index.local)) for p, n in known.items()}
    todo = [p for p in paths if p not in known]
    if todo:
        log.info("%s: counting the samples of %d tar shard(s) without _stats.json/sizes.json", what, len(todo))
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
            for path, offsets in zip(todo, pool.map(index.offsets, todo)):
                out[path] = (len(offsets), tar_pieces(len(offsets), True))
    return out


class TarPieceReader:
    """Reads pieces of tars (`rows` samples from sample `group * TAR_PIECE_SAMPLES` on), keeping the
    offsets of the last tars it read."""

    def __init__(self, fs: Any, cache: Optional[str] = None, keep: int = 16):
        self.index = TarIndex(fs, cache if cache is not None else default_count_cache())
        self.fs = self.index.fs
        self._offsets: OrderedDict = OrderedDict()
        self.keep = keep

    def _offsets_of(self, path: str) -> list[int]:
        if path not in self._offsets:
            self._offsets[path] = self.index.offsets(path)
            while len(self._offsets) > self.keep:
                self._offsets.popitem(last=False)
        self._offsets.move_to_end(path)
        return self._offsets[path]

    def rows(self, path: str, group: int, rows: int) -> dict[str, list]:
        """The piece's samples as columns `key`, `caption`, `jpg` (encoded image bytes) and
        `problem` (None, or `no_image` / `no_caption` / `truncated`)."""
        first = group * TAR_PIECE_SAMPLES
        keys: list = []
        captions: list = []
        images: list = []
        problems: list = []
        truncated = None
        source: Any = None
        # A pieced tar's first piece holds TAR_PIECE_SAMPLES; a one-piece tar is streamed without
        # offsets (a remote one counted from _stats.json has none; one of exactly that many is indexed).
        if first == 0 and rows != TAR_PIECE_SAMPLES:
            source = self.fs.open_input_stream(path, buffer_size=STREAM_BUFFER)
        else:  # a piece of a pieced tar: its bytes in one read, walked in memory (`walk_buffer`)
            offsets = self._offsets_of(path)
            if first < len(offsets):
                stop = first + rows
                with self.fs.open_input_file(path) as fh:
                    end = offsets[stop] if stop < len(offsets) else fh.size()
                    source = fh.read_at(end - offsets[first], offsets[first])
            else:
                truncated = f"the tar holds {len(offsets)} samples"
        if source is not None:
            with source if not isinstance(source, bytes) else contextlib.nullcontext():
                reader = read_samples(source, path)
                for sample in reader:
                    if len(keys) == rows:
                        break
                    keys.append(sample.key)
                    captions.append(sample.caption)
                    images.append(sample.image)
                    problems.append(
                        "no_image" if sample.image is None else "no_caption" if sample.caption is None else None
                    )
                truncated = reader.truncated
        if len(keys) < rows:
            log.warning(
                "%s holds %d of the %d samples of its piece from sample %d (%s)",
                path,
                len(keys),
                rows,
                first,
                truncated or "fewer samples",
            )
            for i in range(first + len(keys), first + rows):
                keys.append(f"{path}#{i}")
                captions.append(None)
                images.append(None)
                problems.append("truncated")
        return {"key": keys, "caption": captions, "jpg": images, "problem": problems}
