"""CLIP_benchmark's WebDataset eval sets (the `wds_*` sets on the Hugging Face hub, and what its
`clip_benchmark_export_wds` writes), read for zero-shot classification and retrieval.

Layout of a set (a local folder or an fsspec prefix such as `s3://bucket/wds_cars`):

    <root>/test/0.tar, 1.tar, ...        the shards of the split (`train/` for a probe's training split)
    <root>/test/nshards.txt              how many: CLIP_benchmark reads exactly 0.tar .. (n-1).tar
    <root>/classnames.txt                one class name per line, in label order (classification)
    <root>/zeroshot_classification_templates.txt   one prompt per line, `{c}` = the class name
    <root>/dataset_type.txt              `retrieval` for caption sets (absent: classification)

A sample is the tar members that share a key (webdataset's rule: the member name up to the first
dot of its file name; the rest, lower-cased, is the extension). The image is the first of `webp`,
`png`, `jpg`, `jpeg` present (CLIP_benchmark's order); a classification sample's label is `cls`
(an integer indexing classnames.txt); a retrieval sample's captions are the lines of `txt`.

At open time the tar headers are read and only the small members (`cls`, `txt`) are read, so
image bytes stay in the shards; a read unit is a run of up to CHUNK_SAMPLES samples of one shard
(`ImageChunk(file=<tar>, tar_skip=<samples before it>)`), read by whoever embeds it (the local loop
or a Ray task), seeking past the samples before it. A sample without an image, label or caption
is dropped at open time and counted (`missing_image`, `missing_label`, `missing_caption`).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import IO, Iterator, Optional

import fsspec
import numpy as np
import pyarrow as pa

from evaluation.chunks import EvalDataset, ImageChunk
from storage import StorageConfig, open_file
from storage.tar_members import walk_members
from storage.webdataset import split_member

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's preference order
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"
CHUNK_SAMPLES = 512  # samples per read unit (a run of one shard's samples)
METADATA_FILES = (CLASSNAMES_FILE, TEMPLATES_FILE, TYPE_FILE)
# Which split folder each key reads when it names the set's root.
SPLIT_OF = {"eval.dataset": "test", "eval.train_dataset": "train", "eval.val_dataset": "val"}


@dataclass
class WdsLayout:
    root: str  # the set's folder (metadata files), inside the filesystem
    split_dir: str  # the folder of the split's shards
    shards: list[str]  # shard paths, in CLIP_benchmark's order


def _full(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _tars(fs, folder: str) -> list[str]:
    return [f for f in fs.ls(folder, detail=False) if f.lower().endswith(".tar")]


def find_wds(fs, path: str, what: str) -> Optional[WdsLayout]:
    """The layout when `path` is a CLIP_benchmark wds set (its root or one split folder), else None."""
    split = SPLIT_OF.get(what, "test")
    candidates = [(path, posixpath.join(path, split))]
    parent = posixpath.dirname(path)
    if parent and parent != path:
        candidates.append((parent, path))  # the split folder itself (e.g. .../wds_cars/test)
    for root, split_dir in candidates:
        if not fs.isdir(split_dir):
            continue
        has_nshards = fs.isfile(posixpath.join(split_dir, NSHARDS_FILE))
        tars = _tars(fs, split_dir)
        if not (has_nshards or tars):
            continue
        if root == parent and not any(fs.isfile(posixpath.join(root, f)) for f in METADATA_FILES):
            continue  # a folder of tars without the set's metadata beside it: not this layout
        return WdsLayout(root, split_dir, _shard_order(fs, split_dir, tars, what))
    return None


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _shard_order(fs, split_dir: str, tars: list[str], what: str) -> list[str]:
    """nshards.txt's 0.tar .. (n-1).tar when present (as CLIP_benchmark), else every .tar in natural order."""
    count_file = posixpath.join(split_dir, NSHARDS_FILE)
    if fs.isfile(count_file):
        text = fs.cat_file(count_file).decode("utf-8").strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{what}: {_full(fs, count_file)} must hold a positive shard count, got {text!r}")
        shards = [posixpath.join(split_dir, f"{i}.tar") for i in range(int(text))]
        missing = [s for s in shards if not fs.isfile(s)]
        if missing:
            raise FileNotFoundError(
                f"{what}: {_full(fs, count_file)} says {text} shards but {len(missing)} are missing "
                f"(e.g. {_full(fs, missing[0])})"
            )
        return shards
    if not tars:
        raise FileNotFoundError(f"{what}: {_full(fs, split_dir)} holds no .tar shard")
    return sorted(tars, key=lambda t: _natural(posixpath.basename(t)))


def _read_lines(fs, path: str) -> Optional[list[str]]:
    if not fs.isfile(path):
        return None
    return [line.strip() for line in fs.cat_file(path).decode("utf-8").splitlines()]


# --- tar samples --------------------------------------------------------------------------------


def iter_samples(fileobj: IO[bytes], read_exts: Optional[set[str]] = None, skip: int = 0) -> Iterator[tuple[str, dict]]:
    """(key, {extension: bytes or None}) per sample of a tar, in member order (a member starts a new
    sample when its key changes or its extension repeats: webdataset's rule).

    read_exts: the extensions whose bytes are read (None: all); the others map to None (their
    presence is known, their bytes are skipped: the tar is read by seeking past them). The first
    `skip` samples are read without any bytes. Members whose name has no extension, and non-file
    members, are ignored, as webdataset does. `fileobj` must be seekable.
    """
    state = {"key": None, "exts": set(), "index": -1}
    starts: list[bool] = []  # per member `want` was asked about: does it start a sample

    def want(member: str) -> bool:  # asked once per member, in order, before it is yielded
        name, ext = split_member(member)  # webdataset's key/extension rule, one place
        if name is None:
            starts.append(False)
            return False
        new = name != state["key"] or ext in state["exts"]
        if new:
            state["key"], state["exts"], state["index"] = name, set(), state["index"] + 1
        state["exts"].add(ext)
        starts.append(new)
        return state["index"] >= skip and (read_exts is None or ext in read_exts)

    key, sample = None, {}
    for i, (_, member, data) in enumerate(walk_members(fileobj, want, seekable=True)):
        name, ext = split_member(member)
        if name is None:
            continue
        if starts[i]:
            if key is not None:
                yield key, sample
            key, sample = name, {}
        sample[ext] = data
    if key is not None:
        yield key, sample


def sample_image(sample: dict) -> Optional[bytes]:
    """The sample's image bytes: the first of webp, png, jpg, jpeg present."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


def read_tar_images(
    url: str, row_start: int, num_rows: int, skip: int, storage: Optional[StorageConfig]
) -> dict[str, np.ndarray]:
    """{"row_id", "image"} for num_rows samples of a shard after its first `skip` (None where a
    sample has no image)."""
    images = np.empty(num_rows, dtype=object)
    with open_file(url, "rb", storage) as fh:
        for i, (_, sample) in enumerate(iter_samples(fh, set(IMAGE_EXTENSIONS), skip=skip)):
            if i >= skip + num_rows:
                break
            if i >= skip:
                images[i - skip] = sample_image(sample)
    return {"row_id": np.arange(row_start, row_start + num_rows, dtype=np.int64), "image": images}


# --- opening a set ------------------------------------------------------------------------------


def open_wds(
    spec: str,
    fs,
    layout: WdsLayout,
    *,
    need_labels: bool,
    need_captions: bool,
    name: Optional[str],
    storage: StorageConfig,
    what: str,
) -> EvalDataset:
    kind = _set_kind(fs, layout.root)
    if kind not in ("classification", "retrieval"):
        raise ValueError(
            f"{what} {spec}: {TYPE_FILE} says {kind!r}; zero-shot classification and retrieval sets are read "
            "(multilabel sets are not supported yet)"
        )
    if need_labels and kind == "retrieval":
        raise ValueError(f"{what} {spec} is a retrieval set ({TYPE_FILE}: retrieval); use eval.task retrieval")
    if need_captions and kind != "retrieval":
        raise ValueError(
            f"{what} {spec} is a classification set (no {TYPE_FILE} saying retrieval); "
            "retrieval needs captions (`txt` members)"
        )
    small = {"txt"} if kind == "retrieval" else {"cls"}
    keys, labels, captions, chunks = [], [], [], []
    rejected = {"missing_image": 0, "missing_label": 0, "missing_caption": 0}
    keep: list[int] = []
    row = 0
    for shard in layout.shards:
        url = _full(fs, shard)
        start = row
        with open_file(url, "rb", storage) as fh:
            for index, (key, sample) in enumerate(iter_samples(fh, small)):
                if index and index % CHUNK_SAMPLES == 0:  # bounded read units: a shard may be large
                    chunks.append(ImageChunk(row - CHUNK_SAMPLES, CHUNK_SAMPLES, url, tar_skip=index - CHUNK_SAMPLES))
                reason = _check(sample, kind)
                if reason:
                    rejected[reason] += 1
                else:
                    keep.append(row)
                    keys.append(key)
                    if kind == "retrieval":
                        captions.append(sample["txt"].decode("utf-8").splitlines())
                    else:
                        labels.append(_label(sample["cls"], url, key, what))
                row += 1
        tail = (row - start) % CHUNK_SAMPLES or min(row - start, CHUNK_SAMPLES)
        if row > start:
            chunks.append(ImageChunk(row - tail, tail, url, tar_skip=row - start - tail))
    columns = {"row_id": np.asarray(keep, dtype=np.int64), "key": keys}
    if kind == "retrieval":
        columns["captions"] = pa.array(captions, type=pa.list_(pa.string()))
    else:
        columns["label"] = np.asarray(labels, dtype=np.int64)
    rejected = {k: v for k, v in rejected.items() if v}
    if not keep:
        raise ValueError(f"{what} {spec}: no usable samples in {len(layout.shards)} shards ({rejected or 'empty'})")
    templates = None
    if kind == "classification":
        templates = [t for t in _read_lines(fs, posixpath.join(layout.root, TEMPLATES_FILE)) or [] if t] or None
    classnames = _read_lines(fs, posixpath.join(layout.root, CLASSNAMES_FILE)) if kind == "classification" else None
    return EvalDataset(
        name or _set_name(layout.root),
        spec,
        "wds",
        pa.table(columns),
        chunks,
        image_in_parquet=False,
        image_column="image",
        storage=storage,
        rejected=rejected,
        image_in_tar=True,
        classnames=classnames,
        templates=templates,
    )


def _set_kind(fs, root: str) -> str:
    """dataset_type.txt's first line, lower-cased; `classification` when absent or empty (CLIP_benchmark's default)."""
    lines = _read_lines(fs, posixpath.join(root, TYPE_FILE)) or [""]
    return lines[0].lower() or "classification"


def _check(sample: dict, kind: str) -> str:
    if not any(ext in sample for ext in IMAGE_EXTENSIONS):
        return "missing_image"
    if kind == "retrieval":
        return "" if "txt" in sample else "missing_caption"
    return "" if "cls" in sample else "missing_label"


def _label(data: bytes, url: str, key: str, what: str) -> int:
    text = data.decode("utf-8").strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what}: sample {key!r} of {url} has cls {text[:40]!r}, not an integer class index") from None


def _set_name(root: str) -> str:
    """`.../wds_vtab-cifar100` -> `vtab/cifar100`, CLIP_benchmark's data set name (`wds_cars_test` -> `cars`)."""
    base = posixpath.basename(root.rstrip("/"))
    if base.startswith("wds_"):
        base = base[len("wds_") :]
        if base.endswith("_test"):
            base = base[: -len("_test")]
        return (
            base.replace("-", "/", 1)
            if base.startswith(("vtab-", "retrieval-", "fairness-", "wilds-", "misc-"))
            else base
        )
    return base
