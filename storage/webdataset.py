"""WebDataset tar shards in img2dataset's and DataComp's layout: the format's rules, in one place for
the pipeline (reading and writing shards) and the training ingest (reading them).

A shard is a POSIX tar whose members are grouped into samples by key: a member's path up to the
first '.' of its file name is the key, the rest (lowercased) its extension, and the members of one
sample are adjacent (the `webdataset` package's and Ray Data's rule). img2dataset writes
`{key}.jpg` (or `.png`/`.webp`), `{key}.txt` (the caption) and `{key}.json` (the row's metadata) per
sample, in that sorted order, and beside shard `{n}.tar` a `{n}_stats.json` whose `successes` is the
number of samples in the tar; open_clip reads a folder's `sizes.json` (`{tar file name: samples}`).

- `expand_braces`: `shards/{00000..00099}.tar` -> the 100 names (webdataset's brace notation).
- `split_member`: member name -> (key, extension).
- `read_samples`: a tar stream -> `Sample`s, a truncated tar ending the stream with `truncated` set.
- `index_samples`: a tar -> the byte offset of each sample (its headers only; the data is seeked past
  in a seekable file), for reading a run of samples from its first one on (`read_samples` on the
  bytes from that offset).
- `metadata_counts`: sample counts from `_stats.json` / `sizes.json` where img2dataset wrote them.
- `TarShardWriter`: samples -> a tar in img2dataset's layout (reproducible: fixed mtime and owner).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator, Optional, Union

from storage.tar_buffer import walk_buffer
from storage.tar_members import TarFormatError, walk_members

TAR_SUFFIX = ".tar"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # open_clip's "jpg;png;jpeg;webp", first found wins
CAPTION_EXTENSION = "txt"
METADATA_EXTENSION = "json"
STATS_SUFFIX = "_stats.json"  # img2dataset: {shard}_stats.json beside {shard}.tar
SIZES_FILE = "sizes.json"  # open_clip / webdataset: {tar name: samples} in the shards' folder

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIX)


def expand_braces(pattern: str) -> list[str]:
    """`a{000..002}b` -> [a000b, a001b, a002b] (zero padding kept from the first bound);
    `a{x,y}` -> [ax, ay]; several groups expand left to right. A pattern without braces is itself.
    Raises ValueError for a range whose end is before its start."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    bounds = _RANGE.match(body)
    if bounds:
        lo, hi = int(bounds.group(1)), int(bounds.group(2))
        if hi < lo:
            raise ValueError(f"brace range {{{body}}} in {pattern!r} ends before it starts")
        width = len(bounds.group(1)) if bounds.group(1).startswith("0") else 0
        choices = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def image_extension(data: bytes) -> str:
    """The extension img2dataset gives encoded image bytes: `jpg`, `png` or `webp` (by magic bytes)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def split_member(name: str) -> tuple[Optional[str], Optional[str]]:
    """`dir/000123.jpg` -> (`dir/000123`, `jpg`); `a.b.txt` -> (`a`, `b.txt`); no dot -> (None, None)."""
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    if dot > base:  # the common case, what the pattern matches first (the key's file name has no '.')
        return name[:dot], name[dot + 1 :].lower()
    match = _MEMBER.match(name)
    if match is None:
        return None, None
    return match.group(1), match.group(2).lower()


@dataclass
class Sample:
    """One sample of a shard: its key, the encoded image (the first of IMAGE_EXTENSIONS present),
    the caption (UTF-8 text of `.txt`) and the raw `.json` bytes; None where the member is absent."""

    key: str
    image: Optional[bytes] = None
    image_ext: Optional[str] = None
    caption: Optional[str] = None
    metadata: Optional[bytes] = None
    members: dict = field(default_factory=dict)  # extension -> bytes, everything the sample holds
    offset: int = 0  # byte position of its first member's header, from where reading began

    def finish(self) -> "Sample":
        for ext in IMAGE_EXTENSIONS:
            if ext in self.members:
                self.image, self.image_ext = self.members[ext], ext
                break
        if self.members.get(CAPTION_EXTENSION) is not None:
            self.caption = self.members[CAPTION_EXTENSION].decode("utf-8", errors="replace")
        self.metadata = self.members.get(METADATA_EXTENSION)
        return self


class SampleReader:
    """Iterate the samples of one tar stream (sequential reads only, so any file object or remote
    stream works), or of a tar's bytes held in memory (`walk_buffer`, the cheaper walk). A tar that
    ends early (cut off, or a damaged header) ends the iteration after the last complete sample;
    `truncated` then holds the reason, and a member cut off mid-data is dropped (its sample keeps
    the members read before it). A key that comes back after other keys is an error in the format
    (ValueError naming the shard). With `read=False` only the headers are read (each sample's
    members map to None; the data is seeked past where `seekable`): an index."""

    def __init__(
        self,
        fileobj: Union[BinaryIO, bytes],
        name: str = "<tar>",
        *,
        read: bool = True,
        seekable: bool = False,
    ):
        self.fileobj, self.name = fileobj, name
        self.read, self.seekable = read, seekable
        self.truncated: Optional[str] = None

    def __iter__(self) -> Iterator[Sample]:
        current: Optional[Sample] = None
        seen: set = set()
        want = None if self.read else _nothing
        try:
            if isinstance(self.fileobj, bytes):
                members = walk_buffer(self.fileobj, want)
            else:
                members = walk_members(self.fileobj, want, seekable=self.seekable)
            for offset, member, data in members:
                key, ext = split_member(member)
                if key is None:
                    continue
                if current is None or key != current.key:
                    if current is not None:
                        seen.add(current.key)
                        yield current.finish()
                    if key in seen:
                        raise ValueError(
                            f"{self.name}: the members of sample {key!r} are not adjacent; WebDataset shards keep "
                            "each sample's files together (re-create the tar sorted by name)"
                        )
                    current = Sample(key, offset=offset)
                current.members[ext] = data
        except (TarFormatError, EOFError, OSError) as exc:
            self.truncated = f"{type(exc).__name__}: {exc}"
        if current is not None:
            yield current.finish()


def _nothing(name: str) -> bool:
    return False


def read_samples(fileobj: Union[BinaryIO, bytes], name: str = "<tar>") -> SampleReader:
    return SampleReader(fileobj, name)


def index_samples(fileobj: BinaryIO, name: str = "<tar>", *, seekable: bool = True) -> list[int]:
    """The byte offset of each sample of a tar (of its first member's header), from its member
    headers alone (a seekable file skips the members' data). A tar cut off lists the samples whose
    first header is before the cut (the reader flags the shard). Raises ValueError when the file is
    not a tar at all, or when a sample's members are not adjacent."""
    reader = SampleReader(fileobj, name, read=False, seekable=seekable)
    offsets = [sample.offset for sample in reader]
    if not offsets and reader.truncated is not None:
        detail = reader.truncated.split(": ", 1)[-1]
        raise ValueError(f"{name} is not a tar file" + ("" if detail == "not a tar file" else f" ({detail})"))
    return offsets


def metadata_counts(read_text, tar_paths: list[str]) -> dict[str, int]:
    """Sample counts img2dataset or open_clip wrote beside the shards: `{n}_stats.json`'s
    `successes`, else the folder's `sizes.json`. `read_text(path)` returns the file's text or None
    where it does not exist. Returns {tar path: samples} for the shards it knows."""
    counts: dict[str, int] = {}
    sizes_by_folder: dict[str, dict] = {}
    for path in tar_paths:
        folder, _, name = path.rpartition("/")
        stats = read_text(path[: -len(TAR_SUFFIX)] + STATS_SUFFIX)
        if stats is not None:
            try:
                counts[path] = int(json.loads(stats)["successes"])
                continue
            except (ValueError, KeyError, TypeError):
                pass  # not img2dataset's stats: try sizes.json, else count
        if folder not in sizes_by_folder:
            text = read_text(f"{folder}/{SIZES_FILE}")
            try:
                sizes_by_folder[folder] = json.loads(text) if text is not None else {}
            except ValueError:
                sizes_by_folder[folder] = {}
        if name in sizes_by_folder[folder]:
            counts[path] = int(sizes_by_folder[folder][name])
    return counts


class TarShardWriter:
    """Write samples to one tar in img2dataset's layout: per sample `{key}.{image ext}`,
    `{key}.json`, `{key}.txt` (sorted by extension, as `webdataset.TarWriter` writes them), mode
    0444, mtime 0 and a fixed owner so the same samples give the same bytes."""

    def __init__(self, fileobj: BinaryIO):
        self._tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def write(self, key: str, image: bytes, image_ext: str, caption: str, metadata: Optional[dict] = None) -> None:
        if split_member(f"{key}.{image_ext}")[0] != key:
            raise ValueError(f"sample key {key!r} holds a '.': WebDataset keys end at the first '.'")
        members: dict[str, bytes] = {image_ext: bytes(image), CAPTION_EXTENSION: caption.encode("utf-8")}
        if metadata is not None:
            members[METADATA_EXTENSION] = json.dumps(metadata, sort_keys=True, default=_json_default).encode()
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(members[ext]), 0o444, 0
            info.uname = info.gname = "clipray"
            self._tar.addfile(info, io.BytesIO(members[ext]))
        self.samples += 1

    def close(self) -> None:
        self._tar.close()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)
