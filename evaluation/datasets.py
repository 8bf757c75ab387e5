"""Evaluation data sets: what `eval.dataset` / `eval.train_dataset` point at, read the same way
by the local loop and by Ray.

Accepted (local paths or fsspec URLs such as `s3://bucket/prefix`):

- an **ImageFolder tree**: `root/<class>/<image>` (ImageNet's val layout after the usual
  `valprep` sort is one). Classes are the sorted folder names; 1000 WordNet-id folders
  (`n01440764`, ...) get the CLIP paper's ImageNet class names unless `eval.classnames` is given.
- a **table**: `.csv`, `.tsv` or `.parquet` file(s) (a file, a folder of them, or a glob) with an
  image column (`eval.image_col`: encoded bytes, or a path relative to the table's folder) and
  a label column (`eval.label_col`) and/or a caption column (`eval.caption_col`). A caption column
  may hold a list of captions; rows that repeat an image path are several captions of one image.
- **pipeline shards**: a pipeline output folder (`{data.output}`, read from `shards/*.parquet`)
  or a folder of shard files; the image is the `jpg` column, extra columns such as the demo's
  `color` / `shape` can be the label (`eval.label_col`).
- a **CLIP_benchmark wds set**: `test/*.tar` (+ `nshards.txt`) beside `classnames.txt`,
  `zeroshot_classification_templates.txt` or `dataset_type.txt` (`evaluation.wds`).

Everything except image bytes is read into the driver at open time (`EvalDataset.meta`, one row per
image with a `row_id`); image bytes stay in their files and are read in chunks (a Parquet row group)
by whoever embeds them, so a cluster never funnels images through the driver. Image paths are data
from outside: they must lie under the image root (`evaluation.image_paths`: the table's folder or
`eval.image_root`) unless `eval.allow_external_image_paths` is set, and the embedding step opens
them. Rows without a label / caption / safe image path are dropped at open time and counted;
undecodable images are counted by the embedding step.

Modules: this one (what a spec is, ImageFolder trees, class names), `evaluation.tables` (tables
and shards), `evaluation.wds` (CLIP_benchmark's WebDataset sets), `evaluation.image_paths` (the path guard), `evaluation.chunks` (`EvalDataset` and its
image reading).
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Optional, Sequence

import fsspec
import numpy as np
import pyarrow as pa

from evaluation.chunks import EvalDataset, ImageChunk, path_chunks, read_chunk
from evaluation.tables import PARQUET_EXTENSIONS, TABLE_EXTENSIONS, default_name, open_table
from evaluation.wds import find_wds, open_wds
from storage import StorageConfig, fsspec_filesystem

__all__ = ["EvalDataset", "ImageChunk", "open_dataset", "read_chunk", "resolve_classes"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_WNID = re.compile(r"^n\d{8}$")
SPLIT_NAMES = {"train", "val", "test"}
SPLIT_OF_KEY = {"eval.dataset": ("test", "val"), "eval.train_dataset": ("train",), "eval.val_dataset": ("val",)}


def _full(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path inside `fs` as a URL that fsspec.open understands anywhere."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def open_dataset(
    spec: str,
    *,
    image_col: str = "jpg",
    label_col: Optional[str] = "label",
    caption_col: Optional[str] = None,
    need_labels: bool = False,
    need_captions: bool = False,
    name: Optional[str] = None,
    storage: Optional[StorageConfig] = None,
    what: str = "eval.dataset",
    image_root: Optional[str] = None,
    allow_external_image_paths: bool = False,
) -> EvalDataset:
    """Open an ImageFolder tree, a CSV/Parquet table or pipeline shards (see the module docstring).

    need_labels / need_captions: fail early (naming the key and the columns found) when the
    source has no such column. image_root / allow_external_image_paths: where a table's image
    paths may point (`evaluation.image_paths`; default: under the table's folder).
    """
    storage = storage.storage() if storage is not None else StorageConfig()
    fs, path = fsspec_filesystem(spec, storage)
    path = path.rstrip("/") or "/"
    table_args = dict(
        image_col=image_col,
        label_col=label_col,
        caption_col=caption_col,
        need_labels=need_labels,
        need_captions=need_captions,
        name=name,
        storage=storage,
        what=what,
        image_root=image_root,
        allow_external_image_paths=allow_external_image_paths,
    )
    if any(ch in path for ch in "*?["):
        files = sorted(fs.glob(path))
        if not files:
            raise FileNotFoundError(f"{what} {spec}: the glob matches no file")
        return open_table(spec, [_full(fs, f) for f in files], **table_args, fmt="table")
    if not fs.exists(path):
        raise FileNotFoundError(f"{what} {spec} does not exist")
    if fs.isfile(path):
        if not path.lower().endswith(TABLE_EXTENSIONS):
            raise ValueError(
                f"{what} {spec}: a file must be a table ({', '.join(TABLE_EXTENSIONS)}); "
                "for images give their folder (an ImageFolder tree)"
            )
        return open_table(spec, [_full(fs, path)], **table_args, fmt="table")
    layout = find_wds(fs, path, what)
    if layout is not None:
        return open_wds(
            spec,
            fs,
            layout,
            need_labels=need_labels,
            need_captions=need_captions,
            name=name,
            storage=storage,
            what=what,
        )
    shards = posixpath.join(path, "shards")
    if fs.isdir(shards):
        files = sorted(f for f in fs.ls(shards, detail=False) if f.lower().endswith(PARQUET_EXTENSIONS))
        if not files:
            raise FileNotFoundError(f"{what} {spec}: {shards} holds no .parquet shard")
        return open_table(spec, [_full(fs, f) for f in files], **table_args, fmt="shards")
    entries = fs.ls(path, detail=True)
    tables = sorted(e["name"] for e in entries if e["type"] == "file" and e["name"].lower().endswith(TABLE_EXTENSIONS))
    if tables:
        parquet_only = all(t.lower().endswith(PARQUET_EXTENSIONS) for t in tables)
        return open_table(spec, [_full(fs, f) for f in tables], **table_args, fmt="shards" if parquet_only else "table")
    dirs = sorted(e["name"] for e in entries if e["type"] == "directory")
    splits = {posixpath.basename(d.rstrip("/")) for d in dirs}
    if splits and splits <= SPLIT_NAMES:  # torchvision's root/{train,val}/<class>/ (ImageNet, CLIP_benchmark)
        wanted = SPLIT_OF_KEY.get(what, ("test", "val"))
        for split in wanted:
            if split in splits:
                args = dict(table_args, name=name or default_name(spec))
                return open_dataset(f"{spec.rstrip('/')}/{split}", **args)
        raise ValueError(
            f"{what} {spec} holds split folders ({', '.join(sorted(splits))}) but no {' or '.join(wanted)}/; "
            "give the split's folder"
        )
    if dirs:
        if need_captions:
            raise ValueError(
                f"{what} {spec} is an ImageFolder tree (class folders), which has no captions; "
                "retrieval needs a table or shards with a caption column"
            )
        return _open_imagefolder(spec, path, fs, dirs, name, storage, what)
    raise ValueError(
        f"{what} {spec}: no shards/, no table files ({', '.join(TABLE_EXTENSIONS)}) and no class "
        "folders; give an ImageFolder tree, a CSV/Parquet table or a pipeline output folder"
    )


def _open_imagefolder(spec, path, fs, dirs, name, storage, what) -> EvalDataset:
    classes = [posixpath.basename(d.rstrip("/")) for d in dirs]
    paths, labels = [], []
    for cls, d in zip(classes, dirs):
        files = sorted(f for f in fs.find(d) if f.lower().endswith(IMAGE_EXTENSIONS))
        paths.extend(_full(fs, f) for f in files)
        labels.extend([cls] * len(files))
    if not paths:
        raise ValueError(f"{what} {spec}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    root = path.rstrip("/") + "/"
    keys = [p.split(root, 1)[-1] for p in paths]
    meta = pa.table({"row_id": np.arange(len(paths), dtype=np.int64), "key": keys, "image": paths, "label": labels})
    return EvalDataset(
        name or default_name(spec),
        spec,
        "imagefolder",
        meta,
        path_chunks(len(paths)),
        image_in_parquet=False,
        image_column="image",
        storage=storage,
        classes=classes,
    )


# --- class names --------------------------------------------------------------------------------


def resolve_classes(
    labels: Sequence[Any],
    *,
    folder_classes: Optional[Sequence[str]] = None,
    classnames: Optional[Sequence[str]] = None,
    need_names: bool = True,
) -> tuple[list[str], np.ndarray, str]:
    """(class names, label index per row, where the names came from).

    - ImageFolder (folder_classes): the label index is the folder's position in sorted order; the
      names are `classnames` (one per folder) or the folder names (1000 WordNet ids: ImageNet's).
    - tables: integer labels index `classnames`; string labels are looked up in `classnames`;
      without `classnames`, the classes are the sorted distinct labels.
    need_names: zero-shot needs real names (integer labels without a class-name file are an error).
    """
    labels = list(labels)
    if folder_classes is not None:
        if folder_classes and all(c.isdigit() for c in folder_classes):
            # ImageNetV2's layout (0/ .. 999/): the folder name is the class index, not its sorted position.
            ints = [int(v) for v in labels]
            given = classnames is not None
            if not given and len(folder_classes) == 1000 and max(ints) < 1000:
                from evaluation.templates import load_classnames

                classnames = load_classnames("imagenet")
            if classnames is None:
                if need_names:
                    raise ValueError(
                        "the class folders are integers (class indices), so zero-shot has no class names: "
                        "give eval.classnames (indexed by the folder numbers)"
                    )
                names = sorted(folder_classes, key=int)
                position = {n: i for i, n in enumerate(names)}
                return names, np.asarray([position[str(v)] for v in labels], dtype=np.int64), "folder numbers"
            names, idx, _ = resolve_classes(ints, classnames=classnames, need_names=need_names)
            source = "eval.classnames (indexed by folder number)" if given else "ImageNet class names (folders 0..999)"
            return names, idx, source
        position = {c: i for i, c in enumerate(folder_classes)}
        idx = np.asarray([position[str(v)] for v in labels], dtype=np.int64)
        if classnames is None and 0 < len(folder_classes) < 1000 and all(_WNID.match(c) for c in folder_classes):
            subset = _imagenet_subset_names(folder_classes)
            if subset is not None:  # ImageNet-A, -R, -O: 200 of the 1000 WordNet ids
                return subset, idx, f"ImageNet class names ({len(folder_classes)} of the 1000 WordNet ids)"
        if classnames is not None:
            if len(classnames) != len(folder_classes):
                raise ValueError(
                    f"eval.classnames has {len(classnames)} names but the ImageFolder tree has "
                    f"{len(folder_classes)} class folders; give one name per folder, in sorted folder order"
                )
            return list(classnames), idx, "eval.classnames (one per folder, sorted folder order)"
        if len(folder_classes) == 1000 and all(_WNID.match(c) for c in folder_classes):
            from evaluation.templates import load_classnames

            return load_classnames("imagenet"), idx, "ImageNet class names (1000 WordNet-id folders)"
        return list(folder_classes), idx, "folder names"
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels)
    if classnames is not None:
        if ints:
            idx = np.asarray(labels, dtype=np.int64)
            bad = idx[(idx < 0) | (idx >= len(classnames))]
            if bad.size:
                raise ValueError(f"label {int(bad[0])} is out of range for the {len(classnames)} class names")
            return list(classnames), idx, "eval.classnames (integer labels index it)"
        position = {n: i for i, n in reversed(list(enumerate(classnames)))}  # first wins on repeats
        unknown = sorted({str(v) for v in labels} - set(position))
        if unknown:
            raise ValueError(
                f"{len(unknown)} labels are not class names: {unknown[:10]}; "
                f"the class names are {list(classnames)[:10]}{' ...' if len(classnames) > 10 else ''}"
            )
        return list(classnames), np.asarray([position[str(v)] for v in labels], dtype=np.int64), "eval.classnames"
    if ints and need_names:
        raise ValueError(
            "the labels are integers, so zero-shot has no class names to prompt with: "
            "give eval.classnames (a built-in name such as imagenet, or a file with one name per line)"
        )
    names = sorted({str(v) for v in labels}, key=(lambda s: int(s)) if ints else None)
    position = {n: i for i, n in enumerate(names)}
    return names, np.asarray([position[str(v)] for v in labels], dtype=np.int64), "sorted distinct labels"


def _imagenet_subset_names(wnids: Sequence[str]) -> Optional[list[str]]:
    """The CLIP ImageNet names of WordNet-id folders that are all ImageNet-1k classes, else None."""
    from evaluation.templates import PROMPTS_DIR, load_classnames

    lines = (PROMPTS_DIR / "imagenet_wnids.txt").read_text(encoding="utf-8").splitlines()
    index = {w: i for i, w in enumerate(line for line in lines if line and not line.startswith("#"))}
    if not all(w in index for w in wnids):
        return None
    names = load_classnames("imagenet")
    return [names[index[w]] for w in wnids]
