"""Image paths named in an eval table: resolved against the table's folder and checked before
anything opens them.

A table's image column is data from outside, and whatever it names is opened with this job's
credentials (`eval.storage_options`): an absolute path, a `../` climbing out of the data set, a URL
(`http://` to an internal address, `s3://` another bucket) or an fsspec chain (`a::b`) would read
something the data set does not hold. So, by default, a path must lie under the **image root**:

- the root is `eval.image_root` (a folder or URL prefix) or, unset, the table's own folder;
- a relative path is joined to the table's folder (as open_clip's and CLIP_benchmark's CSV readers
  resolve against a data root), then `.` and `..` are resolved lexically;
- an absolute path or URL is accepted when it lies under the root with the same scheme
  (`file://` is a local path; scheme aliases such as `s3a` are compared as fsspec's canonical name);
- fsspec chains (`::`) never are.

A path that fails is dropped at open time and counted as `unsafe_image_path`. The check is lexical:
the paths that pass are opened in their resolved form (so `link/..` cannot reach past the check),
and a symbolic link inside the root is followed, as an ImageFolder tree's would be (data sets are
often links to shared storage). `eval.allow_external_image_paths: true` turns the check off for a
table one trusts: relative paths are still joined to the table's folder, all else is used as given.
"""

from __future__ import annotations

import functools
import os
import posixpath
from typing import Optional
from urllib.parse import unquote

import fsspec

UNSAFE_IMAGE_PATH = "unsafe_image_path"
HOW_TO_ALLOW = (
    "set eval.image_root to a folder or URL prefix that holds the images, or "
    "eval.allow_external_image_paths: true for a table you trust"
)

Location = tuple[Optional[str], str]  # (canonical protocol, None for local files; normalised path)


class ImagePathResolver:
    """Resolves one table's image paths: `resolve(value)` -> (path to open or None, reason, detail).

    table_dir: the folder holding the table (a local path or `proto://...` URL);
    image_root: where paths must lie (None: table_dir); allow_external: accept any path.
    """

    def __init__(self, table_dir: str, image_root: Optional[str] = None, allow_external: bool = False):
        self.table_dir = table_dir
        self.allow_external = allow_external
        root = _location(image_root if image_root is not None else table_dir)
        if root is None:
            what = f"eval.image_root {image_root!r}" if image_root is not None else f"the table's folder {table_dir!r}"
            raise ValueError(
                f"{what} is not a folder or URL prefix that image paths can be checked against "
                "(an unknown scheme or an fsspec chain '::'); give eval.image_root as a local "
                "folder or a URL prefix such as s3://bucket/prefix"
            )
        self.root = root
        table = _location(table_dir)
        # A relative path of plain names (no '', '.', '..') stays in the table's folder, so when that
        # folder lies under the root it needs no per-row normalising (a million-row table's cost).
        self._table_under_root = table is not None and _text(table) == table_dir.rstrip("/") and _under(table, root)

    def resolve(self, value: Optional[str]) -> tuple[Optional[str], str, str]:
        """(path or URL to open, "", "") for an accepted value; (None, reason, detail) for a dropped
        one, reason being "missing_image" or UNSAFE_IMAGE_PATH and detail saying why."""
        if value is None or value == "":
            return None, "missing_image", "no image path"
        if self.allow_external:
            if "://" in value or value.startswith("/"):
                return value, "", ""
            return posixpath.join(self.table_dir, value), "", ""
        if "::" in value:
            return None, UNSAFE_IMAGE_PATH, f"{value!r} is an fsspec chained URL"
        if (
            self._table_under_root
            and ":" not in value
            and not value.startswith("/")
            and not any(seg in ("", ".", "..") for seg in value.split("/"))
        ):
            return f"{self.table_dir.rstrip('/')}/{value}", "", ""
        is_url = "://" in value and not value.startswith("file://")
        joined = value if is_url or value.startswith(("/", "file://")) else posixpath.join(self.table_dir, value)
        where = _location(joined)
        if where is None:
            return None, UNSAFE_IMAGE_PATH, f"{value!r} uses an unknown scheme or climbs above the top with '..'"
        if not _under(where, self.root) or (where[0] is not None and not _under_decoded(where, self.root)):
            return None, UNSAFE_IMAGE_PATH, f"{value!r} resolves to {_text(where)}, outside {_text(self.root)}"
        return _text(where), "", ""


def _text(where: Location) -> str:
    protocol, path = where
    return path if protocol is None else f"{protocol}://{path}"


def _location(spec: str) -> Optional[Location]:
    """(canonical protocol or None for local, normalised path); None when it cannot be checked."""
    if "::" in spec:
        return None
    if spec.startswith("file://"):
        spec = spec[len("file://") :]
    if "://" in spec:
        scheme, path = spec.split("://", 1)
        protocol = _canonical(scheme.lower())
        if protocol is None or protocol in ("file", "local"):
            return None if protocol is None else _local(path)
        path = _normalise(path, keep_empty=True)
        return None if path is None else (protocol, path)
    return _local(spec)


def _local(path: str) -> Optional[Location]:
    path = _normalise(os.path.abspath(os.path.expanduser(path)) if not path.startswith("/") else path, keep_empty=False)
    return None if path is None else (None, path)


@functools.lru_cache(maxsize=64)
def _canonical(scheme: str) -> Optional[str]:
    """fsspec's first protocol name for a scheme (`s3a` -> `s3`), None when fsspec knows none."""
    try:
        cls = fsspec.get_filesystem_class(scheme)
    except (ValueError, ImportError):
        return None
    names = cls.protocol if isinstance(cls.protocol, (tuple, list)) else (cls.protocol,)
    return names[0] if scheme not in ("http", "https") else scheme


def _normalise(path: str, keep_empty: bool) -> Optional[str]:
    """`.` and `..` resolved lexically; None when `..` climbs above the first segment. Empty
    segments (`a//b`) are kept for object stores, where they are part of the key."""
    lead = "/" if path.startswith("/") else ""
    parts: list[str] = []
    for seg in path.split("/")[1 if lead else 0 :]:
        if seg == "." or (seg == "" and not keep_empty):
            continue
        if seg == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(seg)
    return lead + "/".join(parts)


def _under(where: Location, root: Location) -> bool:
    if where[0] != root[0]:
        return False
    top = root[1].rstrip("/")
    return where[1] == top or where[1].startswith(top + "/")


def _under_decoded(where: Location, root: Location) -> bool:
    """A URL's percent-escapes (`%2e%2e`) decoded may climb too, where the server decodes them."""
    decoded = _normalise(unquote(where[1]), keep_empty=True)
    return decoded is not None and _under((where[0], decoded), root)
