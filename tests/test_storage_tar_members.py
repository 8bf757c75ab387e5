"""storage/tar_members.py, the tar reader under the WebDataset shards, against `tarfile` (the
standard library's reader and writer) on the formats tarfile writes: every regular member, name and
byte the same; a damaged or cut-off stream reported after the members before the damage."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from storage.tar_buffer import _scan, walk_buffer
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


# --- walk_buffer (storage/tar_buffer.py): the in-memory walk agrees with walk_members everywhere --


def _walk(walker, raw: bytes, want=None):
    """(members yielded, the error's type and message or None)."""
    got = []
    try:
        for member in walker(raw, want):
            got.append(member)
    except TarFormatError as exc:
        return got, str(exc)
    return got, None


def _reference(raw: bytes, want=None):
    return walk_members(io.BytesIO(raw), want, seekable=True)


def _webdataset_tar(samples: int) -> bytes:
    """A shard as img2dataset writes it: `webdataset.TarWriter` (pax headers for float mtimes)."""
    import webdataset as wds

    buf = io.BytesIO()
    writer = wds.TarWriter(buf)
    for i in range(samples):
        writer.write({"__key__": f"{i:09d}", "jpg": os.urandom(700 + 97 * i), "txt": f"caption {i}", "json": b"{}"})
    writer.close()
    return buf.getvalue()


@pytest.mark.parametrize("fmt", list(NAMES), ids=["ustar", "gnu", "pax"])
def test_walk_buffer_yields_what_walk_members_yields(fmt):
    raw = _tar(fmt, NAMES[fmt])
    for want in (None, lambda name: name.endswith(".txt")):
        assert _walk(walk_buffer, raw, want) == _walk(_reference, raw, want)
        assert _walk(walk_buffer, raw, want)[1] is None


def test_walk_buffer_reads_webdataset_and_tarfile_shards_without_the_reference():
    """The shards people have take the numpy walk (not the fallback), and from any sample's offset."""
    raw = _webdataset_tar(20)
    members = list(walk_members(io.BytesIO(raw)))
    assert _scan(raw) is not None and len(_scan(raw)) == 60
    assert list(walk_buffer(raw)) == members
    offset = members[30][0]  # sample 10's first header: a piece read from its offset on
    assert [(o + offset, n, d) for o, n, d in walk_buffer(raw[offset:])] == members[30:]
    ustar = _tar(tarfile.USTAR_FORMAT, ["000.jpg", "000.txt", "001.jpg", "001.txt"])
    assert _scan(ustar) is not None and _scan(_tar(tarfile.GNU_FORMAT, ["000.jpg", "000.txt"])) is not None


def test_walk_buffer_agrees_with_walk_members_on_damaged_and_cut_tars():
    """Every cut and a few thousand single-byte changes in the headers (seeded): the same members,
    then the same error (or none), from both walks."""
    import random

    rng = random.Random(0)
    tars = [_webdataset_tar(6)] + [_tar(fmt, NAMES[fmt]) for fmt in NAMES]
    cases = 0
    for raw in tars:
        for cut in range(0, len(raw), 173):
            assert _walk(walk_buffer, raw[:cut]) == _walk(_reference, raw[:cut]), cut
            cases += 1
        headers = [offset for offset, _, _ in walk_members(io.BytesIO(raw))]
        for _ in range(600):
            damaged = bytearray(raw)
            at = rng.choice(headers) + rng.choice([rng.randrange(512), 124 + rng.randrange(12), 148 + rng.randrange(8)])
            damaged[at] = rng.choice([0, 0x20, ord("0"), ord("7"), ord("9"), rng.randrange(256)])
            if rng.random() < 0.5:  # also a header with a matching checksum (only the field changed)
                damaged = _fix_checksum(damaged, at - at % 512)
            want = rng.choice([None, lambda name: name.endswith("txt")])
            assert _walk(walk_buffer, bytes(damaged), want) == _walk(_reference, bytes(damaged), want), at
            cases += 1
    assert cases > 2000


def _fix_checksum(raw: bytearray, header: int) -> bytearray:
    block = raw[header : header + 512]
    block[148:156] = b" " * 8
    raw[header + 148 : header + 156] = b"%06o\x00 " % sum(block)
    return raw


def test_a_huge_size_in_a_header_with_a_good_checksum_is_a_cut_not_an_allocation():
    """A base-256 size of 2**86 (or 8**11 - 1 in octal) on an intact header: the stream ends inside
    that member, reported as such by both walks, seekable or not (found by the test above)."""
    raw = bytearray(_tar(tarfile.USTAR_FORMAT, ["000.jpg", "000.txt"]))
    second = raw.index(b"000.txt")
    for field in (b"\x80\x40" + bytes(10), b"77777777777\x00"):
        damaged = bytearray(raw)
        damaged[second + 124 : second + 136] = field
        damaged = bytes(_fix_checksum(damaged, second))
        for walker in (walk_buffer, _reference, lambda raw, want: walk_members(_Stream(raw), want)):
            got, error = _walk(walker, damaged)
            assert [name for _, name, _ in got] == ["000.jpg"] and "ends inside member 000.txt" in error
