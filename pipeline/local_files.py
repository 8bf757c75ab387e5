"""`data.local_root`: images on a local disk instead of the web (local image folders with a
captions CSV). With it set, a row's URL that is a relative path, or a `file://` URL, names a file
under `local_root`; the file is read instead of fetched, then checked, resized and filtered like a
download. Nothing outside `local_root` is read: the path is resolved (`..` and symlinks followed)
and must stay inside the resolved root, and only regular files up to `data.max_response_bytes`
are read. Without `local_root`, `file://` stays refused (`download/unsupported_scheme`).

Rejections (stage download): `outside_local_root` (the path leaves the root, or is absolute and
not under it), `local_file_error` (missing, not a regular file, unreadable; the detail says which),
`response_too_large`.
"""

from __future__ import annotations

import os
import stat
from typing import Optional
from urllib.parse import unquote, urlsplit

from pipeline.fetch import FetchResult


def is_local_reference(url: Optional[str]) -> bool:
    """A relative path or a `file://` URL (what `local_root` serves); http(s) and other schemes are not."""
    if not url:
        return False
    return url.startswith("file://") or "://" not in url


class LocalFiles:
    """Reads the files under one root (see the module doc); thread-safe."""

    def __init__(self, root: str, max_bytes: int):
        self.root = os.path.realpath(root)
        self.max_bytes = max_bytes

    def fetch(self, url: str) -> FetchResult:
        path = unquote(urlsplit(url).path) if url.startswith("file://") else url
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(self.root, path))
        if full != self.root and not full.startswith(self.root + os.sep):
            return FetchResult(None, "outside_local_root", f"{url!r} is not under data.local_root {self.root}")
        try:
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            return FetchResult(None, "local_file_error", f"{url!r}: {exc.strerror or exc}")
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return FetchResult(None, "local_file_error", f"{url!r} is not a regular file")
            if info.st_size > self.max_bytes:
                return FetchResult(
                    None, "response_too_large", f"{url!r} has {info.st_size} bytes > data.max_response_bytes"
                )
            with os.fdopen(fd, "rb", closefd=True) as fh:
                fd = -1
                body = fh.read(self.max_bytes + 1)
            return FetchResult(body, url=url, attempts=1)
        except OSError as exc:
            return FetchResult(None, "local_file_error", f"{url!r}: {exc.strerror or exc}")
        finally:
            if fd >= 0:
                os.close(fd)


def served_locally(url: Optional[str], image: Optional[bytes], files: Optional[LocalFiles]) -> Optional[FetchResult]:
    """The row's image without a request, or None when it must be fetched: the staged image of a
    WebDataset input row, else the file a local reference names under `data.local_root`."""
    if image is not None:
        return FetchResult(image, url=url or "")
    if files is not None and is_local_reference(url):
        return files.fetch(url)
    return None
