"""WebDataset tar shards in the training ingest: their sample counts (for the plan) and their rows
(for the reader). The format's rules (keys, extensions, braces) are `storage.webdataset`'s.

Counts: img2dataset's `{n}_stats.json` or open_clip's `sizes.json` where present; otherwise the
tar's member headers are read once and the count is cached as
`{cache}/{blake2(uri, size, mtime)}.json` (`default_count_cache()`: `$XDG_CACHE_HOME/clipray/
webdataset-counts`, else `~/.cache/...`), so a rerun, a resume or a sweep's trials do not read
the shards again; a changed shard (size or mtime) is counted anew.

Rows: a tar is one read piece (one "row group" of the plan): its samples are read in order and the
first `rows` kept. A sample without an image or a caption keeps its place with a problem code, and
a shard that ends before its count is padded with `truncated` rows, so the row indices of the stream
(the data position) are the plan's whatever the shard holds; the Rebatcher drops and counts them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

from storage.webdataset import count_samples, metadata_counts, read_samples

log = logging.getLogger(__name__)


def default_count_cache() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "clipray", "webdataset-counts")


def _read_text(fs: Any, path: str) -> Optional[str]:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read().decode("utf-8", errors="replace")


def _open(fs: Any, path: str, seekable: bool):
    return fs.open_input_file(path) if seekable else fs.open_input_stream(path)


def tar_counts(
    fs: Any, paths: Sequence[str], *, cache: Optional[str], what: str = "train.data", threads: int = 16
) -> dict[str, int]:
    """{tar path: samples} for `paths` on pyarrow filesystem `fs` (see the module doc). Raises
    ValueError naming a path that is not a tar at all."""
    import pyarrow.fs as pafs

    known = metadata_counts(lambda p: _read_text(fs, p), list(paths))
    todo = [p for p in paths if p not in known]
    local = isinstance(fs, pafs.LocalFileSystem)

    def count(path: str) -> int:
        info = fs.get_file_info(path)
        stamp = f"{fs.type_name}\0{path}\0{info.size}\0{info.mtime_ns}"
        entry = Path(cache, hashlib.blake2b(stamp.encode(), digest_size=16).hexdigest() + ".json") if cache else None
        if entry is not None and entry.is_file():
            try:
                return int(json.loads(entry.read_text())["samples"])
            except (ValueError, KeyError, OSError):
                pass  # a damaged cache entry: count again
        with _open(fs, path, seekable=local) as fh:
            try:
                samples = count_samples(fh, path, seekable=local)
            except ValueError as exc:
                raise ValueError(f"{what}: {exc}") from None
        if entry is not None:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"uri": path, "size": info.size, "samples": samples}))
            os.replace(tmp, entry)
        return samples

    if todo:
        log.info("%s: counting the samples of %d tar shard(s) without _stats.json/sizes.json", what, len(todo))
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
            known.update(zip(todo, pool.map(count, todo)))
    return known


def tar_rows(fs: Any, path: str, rows: int) -> dict[str, list]:
    """The first `rows` samples of one tar as columns `key`, `caption`, `jpg` (encoded image bytes)
    and `problem` (None, or `no_image` / `no_caption` / `truncated`)."""
    keys: list = []
    captions: list = []
    images: list = []
    problems: list = []
    stream = fs.open_input_stream(path) if fs is not None else open(path, "rb")
    with stream:
        reader = read_samples(stream, path)
        for sample in reader:
            if len(keys) == rows:
                break
            keys.append(sample.key)
            captions.append(sample.caption)
            images.append(sample.image)
            problems.append("no_image" if sample.image is None else "no_caption" if sample.caption is None else None)
    if len(keys) < rows:
        log.warning("%s holds %d of its %d samples (%s)", path, len(keys), rows, reader.truncated or "fewer samples")
        for i in range(len(keys), rows):
            keys.append(f"{path}#{i}")
            captions.append(None)
            images.append(None)
            problems.append("truncated")
    return {"key": keys, "caption": captions, "jpg": images, "problem": problems}
