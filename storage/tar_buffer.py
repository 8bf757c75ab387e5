"""The members of a tar held in memory (a training piece, read with one ranged read): what
`tar_members.walk_members` yields for the same bytes, for a third of its CPU.

`walk_members` is the reference: it reads a stream header by header, checks each checksum and
parses each pax header as it goes, ~5 us per member in Python here. A WebDataset sample written by
`webdataset.TarWriter` (img2dataset's writer) has three members and six headers (a pax header for
each float mtime). Over bytes in memory the walk can be lighter: a header's size is read in place
and the next header found from it, a pax header is only checked to be one record without `path`
or `size` (so it changes nothing), and all the checksums are summed in one numpy call at the end,
before anything is yielded. Whatever a well-formed tar from tarfile, GNU tar or webdataset does not
hold (a bad checksum, a cut-off header or member, a pax header that matters, a GNU long name, a
base-256 size) hands the whole buffer to `walk_members`, which yields and reports it exactly as it
does for a stream: the two agree on every input (`tests/test_storage_tar_members.py` runs both on
the same tars, cut and damaged).
"""

from __future__ import annotations

import io
from typing import Callable, Iterator, Optional

import numpy as np

from storage.tar_members import (
    _GNU_LONG_NAME,
    _PAX_HEADER,
    _REGULAR,
    _ZERO_BLOCK,
    BLOCK,
    _checksum_ok,
    _member_name,
    walk_members,
)

# The header's type byte as an int (what indexing bytes gives), from the stream walker's types.
_REGULAR_KINDS = frozenset(kind[0] for kind in _REGULAR)
_PAX = _PAX_HEADER[0]
_LONG_NAME = _GNU_LONG_NAME[0]
_CHECKSUM_POWERS = 8 ** np.arange(5, -1, -1, dtype=np.int64)  # a 6-digit checksum field


def walk_buffer(buf: bytes, want: Optional[Callable[[str], bool]] = None) -> Iterator[tuple[int, str, Optional[bytes]]]:
    """Yield what `walk_members(io.BytesIO(buf), want)` yields: (offset, name, data or None) per
    regular member, `want(name)` asked once per member in order."""
    members = _scan(buf)
    if members is None:
        yield from walk_members(io.BytesIO(buf), want, seekable=True)
        return
    for start, name, begin, size in members:
        yield start, name, (buf[begin : begin + size] if want is None or want(name) else None)


def _scan(buf: bytes) -> Optional[list[tuple[int, str, int, int]]]:
    """(offset, name, data start, size) of every regular member of an intact tar in memory; None
    for anything `walk_members` has to read (see the module doc)."""
    n = len(buf)
    headers: list[int] = []  # offsets
    members: list[tuple[int, str, int, int]] = []
    pos = start = 0
    while pos < n:
        try:  # the size field as `tar_members._number` reads octal text (base-256 is not ASCII)
            size = int(buf[pos + 124 : pos + 136].split(b"\x00", 1)[0], 8)
        except ValueError:
            if headers and buf[pos : pos + BLOCK] == _ZERO_BLOCK:
                break  # the end-of-archive marker
            return None
        headers.append(pos)
        begin = pos + BLOCK
        pos = begin + size + (-size % BLOCK)
        if size < 0 or pos > n:
            return None  # a header or a member cut off (or damage)
        kind = buf[begin - BLOCK + 156]
        if kind == _PAX:
            # One record without `path` or `size` (`28 mtime=1796603512.18\n`, what tarfile writes
            # for a float mtime) is read by `_pax_records` without an error and changes nothing.
            records = buf[begin : begin + size]
            if not records.startswith(b"%d " % size) or b"path" in records or b"size" in records:
                return None
            continue
        if kind in _REGULAR_KINDS:
            if buf[begin - BLOCK + 345]:  # a ustar name prefix
                name = _member_name(
                    buf[begin - BLOCK : begin - 412],
                    buf[begin - 255 : begin - 250],
                    buf[begin - 167 : begin - 12],
                    {},
                    None,
                )
            else:
                name = buf[begin - BLOCK : begin - 412].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            members.append((start, name, begin, size))
        elif kind == _LONG_NAME:
            return None
        start = pos
    if not headers:
        return None
    count = n // BLOCK
    blocks = np.frombuffer(buf, dtype=np.uint8, count=count * BLOCK).reshape(count, BLOCK)
    if not _checksums_ok(blocks[np.asarray(headers) // BLOCK]):
        return None
    return members


def _checksums_ok(headers: np.ndarray) -> bool:
    """`tar_members._checksum_ok` for every row of `headers` (512-byte header blocks): the sums in
    numpy, the stored values too where written as tarfile and GNU tar write them (six octal digits,
    NUL, space), in Python for any other row."""
    field = headers[:, 148:156].astype(np.int64)
    halves = headers.reshape(-1, 2, BLOCK // 2).sum(axis=2, dtype=np.uint16)  # <= 256 x 255 each
    sums = halves.sum(axis=1, dtype=np.int64) - field.sum(axis=1) + 8 * 0x20
    digits = field[:, :6] - ord("0")
    usual = ((digits >= 0) & (digits <= 7)).all(axis=1) & (field[:, 6] == 0) & (field[:, 7] == 0x20)
    if not np.array_equal(sums[usual], (digits @ _CHECKSUM_POWERS)[usual]):
        return False
    return all(_checksum_ok(headers[i].tobytes()) for i in np.flatnonzero(~usual))
