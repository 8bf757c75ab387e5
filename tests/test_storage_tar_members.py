"""storage/tar_members.py, the tar reader under the WebDataset shards, against `tarfile` (the
standard library's reader and writer) on the formats tarfile writes: every regular member, name and
byte the same; a damaged or cut-off stream reported after the members before the damage."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from storage.tar_members import TarFormatError, iter_members, walk_members


def _tar(fmt: int, names: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("a-folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("a-link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "elsewhere"
        tar.addfile(link)
        for i, name in enumerate(names):
            data = os.urandom(i * 300 + (512 if i % 2 else 0))  # sizes on and off block boundaries
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tarfile_members(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar if info.isreg()]


NAMES = {
    tarfile.USTAR_FORMAT: ["000.jpg", "000.txt", "d" * 120 + "/001.jpg", "001.json"],  # a ustar prefix
    tarfile.GNU_FORMAT: ["000.jpg", "x" * 150 + ".txt", "001.jpg", "001.txt"],  # a GNU long name
    tarfile.PAX_FORMAT: ["000.jpg", "çà-日本/" + "y" * 140 + ".txt", "001.webp", "001.txt"],  # pax paths
}


@pytest.mark.parametrize("fmt", list(NAMES), ids=["ustar", "gnu", "pax"])
def test_every_regular_member_comes_back_as_tarfile_reads_it(fmt):
    raw = _tar(fmt, NAMES[fmt])
    got = list(iter_members(io.BytesIO(raw)))
    assert got == _tarfile_members(raw)
    assert [name for name, _ in got] == NAMES[fmt]


def test_a_stream_without_end_blocks_and_one_read_in_small_pieces_give_the_same_members():
    raw = _tar(tarfile.USTAR_FORMAT, NAMES[tarfile.USTAR_FORMAT])
    expected = _tarfile_members(raw)
    end = raw.rstrip(b"\x00")
    end += b"\x00" * (-len(end) % 512)
    assert list(iter_members(io.BytesIO(end))) == expected

    class Trickle(io.RawIOBase):  # a remote stream that returns at most 100 bytes per read
        def __init__(self, data: bytes):
            self.data, self.pos = data, 0

        def read(self, size=-1):
            chunk = self.data[self.pos : self.pos + min(100, size if size >= 0 else 100)]
            self.pos += len(chunk)
            return chunk

    assert list(iter_members(Trickle(raw))) == expected


def test_damage_is_reported_after_the_members_before_it():
    raw = _tar(tarfile.USTAR_FORMAT, ["000.jpg", "000.txt", "001.jpg", "001.txt"])
    members = _tarfile_members(raw)
    third = raw.index(b"001.jpg")  # the third member's header
    got = []
    with pytest.raises(TarFormatError, match="ends inside member 001.jpg"):
        for member in iter_members(io.BytesIO(raw[: third + 512 + 100])):
            got.append(member)
    assert got == members[:2]
    damaged = bytearray(raw)
    damaged[third + 10] ^= 0xFF  # a header byte: the checksum no longer matches
    with pytest.raises(TarFormatError, match="bad checksum"):
        list(iter_members(io.BytesIO(bytes(damaged))))
    with pytest.raises(TarFormatError, match="not a tar file"):
        list(iter_members(io.BytesIO(b"\xff\xd8 a JPEG, not a tar " + bytes(600))))
    with pytest.raises(TarFormatError, match="empty file"):
        list(iter_members(io.BytesIO(b"")))
    with pytest.raises(TarFormatError, match=r"not a tar file \(300 bytes\)"):
        list(iter_members(io.BytesIO(raw[:300])))
    with pytest.raises(TarFormatError, match="inside a member header"):
        list(iter_members(io.BytesIO(raw[: third + 300])))


class _Stream:
    """A stream that can only be read (no seek, no tell): a remote tar."""

    def __init__(self, data: bytes):
        self.read = io.BytesIO(data).read


@pytest.mark.parametrize("fmt", list(NAMES), ids=["ustar", "gnu", "pax"])
def test_walk_gives_tarfile_s_member_offsets_and_skips_unwanted_data_seeking_or_reading(fmt):
    raw = _tar(fmt, NAMES[fmt])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = [(info.offset, info.name) for info in tar if info.isreg()]
    data = dict(_tarfile_members(raw))

    def want(name):
        return name.endswith(".txt")

    seeking = list(walk_members(io.BytesIO(raw), want, seekable=True))
    assert [(offset, name) for offset, name, _ in seeking] == expected
    assert [d for _, _, d in seeking] == [data[n] if n.endswith(".txt") else None for _, n in expected]
    assert list(walk_members(_Stream(raw), want)) == seeking
    # From a member's offset on, the rest of the tar reads alone (offsets relative to the start).
    offset, name, _ = seeking[2]
    assert [(o + offset, n) for o, n, _ in walk_members(io.BytesIO(raw[offset:]))] == expected[2:]


def test_a_member_cut_off_in_its_skipped_data_is_yielded_then_reported():
    raw = _tar(tarfile.USTAR_FORMAT, ["000.jpg", "000.txt", "001.jpg", "001.txt"])
    third = raw.index(b"001.jpg")
    for stream, seekable in ((io.BytesIO(raw[: third + 512 + 100]), True), (_Stream(raw[: third + 512 + 100]), False)):
        got = []
        with pytest.raises(TarFormatError, match="ends inside member 001.jpg"):
            for _, name, data in walk_members(stream, lambda name: False, seekable=seekable):
                got.append((name, data))
        assert got == [("000.jpg", None), ("000.txt", None), ("001.jpg", None)]
