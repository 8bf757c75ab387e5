"""Training ingest: pipeline shards -> ready uint8 image batches and token ids on each Train worker.

Two halves:

* Pure, testable without Ray: `list_shards` (files, row counts and row groups from Parquet
  footers), `plan_pass` (the seeded file order of a pass and its split over workers),
  `pass_units` (a worker's pass as row-group read units, from any row on), `Preprocess` (decode ->
  random square crop -> resize -> tokenize for one batch of rows), `ShardReader` (read one unit
  with pyarrow + Preprocess) and `Rebatcher` (exact local batches, rejected rows dropped, the data
  position of every batch).
* Ray Data wiring: `ShardStream` runs, per worker, one Dataset for the whole run:
  `from_items(read units)` -> `map_batches(ShardReader)` on a pool of CPU actors (any node, rows
  kept in order) -> `iter_torch_batches` with prefetch, and hands the training loop exact batches.

Why read units and not `read_parquet(files)`: a worker reads the same file again in a later pass
and `read_parquet` drops repeated paths, so a multi-pass stream would need one Dataset (one
executor and actor pool start) per pass, which costs seconds per pass and dominates small runs;
units also let a resumed run start at the exact row without decoding what it skips, and carry the
pass into the crop seed. The reading itself is pyarrow's (`ParquetFile.iter_batches` of a row group).

Data position and passes (docs/training.md): pass p orders the shard files by a permutation
seeded with (train.seed, p) and deals them to workers, rows balanced. Each worker reads its files
of pass p in order, in windows of `train.shuffle_rows` rows whose rows are permuted by a seeded
generator, so its stream is deterministic, and its position is (pass, rows of its stream of that
pass already consumed). A checkpoint stores every worker's position; a resumed run starts right
after it: no sample of the current pass is replayed or skipped. Crops are seeded by
(train.seed, pass, key): a resumed run sees the same crops as an uninterrupted one.
"""
from __future__ import annotations

import fnmatch
import hashlib
import heapq
import logging
import os
import queue
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

KEY_COL, CAPTION_COL, IMAGE_COL = "key", "caption", "jpg"
REQUIRED_COLUMNS = (KEY_COL, CAPTION_COL, IMAGE_COL)
# Status codes of the `status` column (0 = usable); the names are the reasons reported in metrics.
REJECT_REASONS = ("ok", "not_an_image", "no_image")


# ---------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    path: str  # in the filesystem's own form (no scheme for pyarrow filesystems)
    rows: int
    row_groups: tuple[int, ...] = ()  # rows per row group; () = one group of `rows`

    @property
    def groups(self) -> tuple[int, ...]:
        return self.row_groups or (self.rows,)


def resolve_filesystem(location: str, filesystem: Any = None) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or URL (s3://, gs://, file://)."""
    import pyarrow.fs as pafs

    if filesystem is not None:
        path = location.split("://", 1)[1] if "://" in location else location
        return filesystem, path
    if "://" not in location:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    return pafs.FileSystem.from_uri(location)


def list_shards(locations: Sequence[str], filesystem: Any = None, *, what: str = "train.data",
                threads: int = 32) -> tuple[Any, list[Shard]]:
    """Find the Parquet shards under `locations` (folders, files or globs) and read their footers.

    Returns (filesystem, non-empty shards sorted by path). Raises FileNotFoundError for a missing
    location and ValueError naming the location without shards or the shard without a column.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if not locations:
        raise ValueError(f"{what} is empty: give one or more shard folders (a pipeline's {{output}}/shards)")
    fs = filesystem
    paths: list[str] = []
    for location in locations:
        fs_here, path = resolve_filesystem(location, filesystem)
        if fs is None:
            fs = fs_here
        elif type(fs) is not type(fs_here):
            raise ValueError(f"{what}: all locations must be on one filesystem; {location} is not")
        if any(c in path for c in "*?["):
            cut = min(path.find(c) for c in "*?[" if c in path)
            parent = path[:cut].rsplit("/", 1)[0] or "/"
            infos = fs_here.get_file_info(pafs.FileSelector(parent, recursive=True, allow_not_found=True))
            found = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        else:
            info = fs_here.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{what}: {location} does not exist")
            if info.type == pafs.FileType.File:
                found = [path]
            else:
                infos = fs_here.get_file_info(pafs.FileSelector(path, recursive=True))
                found = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                         and not os.path.basename(i.path).startswith((".", "_"))]
        if not found:
            raise ValueError(f"{what}: {location} holds no .parquet shard")
        paths.extend(found)
    paths = sorted(set(paths))

    def footer(path: str) -> Shard:
        try:
            meta = pq.read_metadata(path, filesystem=fs)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{what}: {path} is not a readable Parquet file ({exc})") from None
        names = set(meta.schema.names)
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{what}: shard {path} lacks column(s) {', '.join(missing)} "
                             f"(has: {', '.join(sorted(names))}); training reads the pipeline's "
                             f"shard layout: {', '.join(REQUIRED_COLUMNS)}")
        groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        return Shard(path, meta.num_rows, groups)

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        shards = list(pool.map(footer, paths))
    if sum(s.rows for s in shards) == 0:
        raise ValueError(f"{what}: the {len(shards)} shard(s) under {', '.join(locations)} hold no rows")
    return fs, [s for s in shards if s.rows > 0]


def plan_pass(shards: Sequence[Shard], num_workers: int, seed: int, pass_index: int) -> list[list[Shard]]:
    """Each worker's files of pass `pass_index`, in reading order.

    The files are permuted with a generator seeded by (seed, pass_index), then dealt one by one to
    the worker with the fewest rows so far (ties rotate with the pass, so with fewer files than
    workers every worker gets data in turn). Deterministic: a resumed run recomputes the same plan.
    """
    order = np.random.default_rng([seed, pass_index]).permutation(len(shards))
    heap = [(0, (w - pass_index) % num_workers, w) for w in range(num_workers)]
    heapq.heapify(heap)
    plan: list[list[Shard]] = [[] for _ in range(num_workers)]
    for i in order:
        rows, tie, worker = heapq.heappop(heap)
        plan[worker].append(shards[int(i)])
        heapq.heappush(heap, (rows + shards[int(i)].rows, tie, worker))
    return plan


def plan_fingerprint(shards: Sequence[Shard], num_workers: int, seed: int) -> str:
    """Identifies the plan a data position refers to (files, row counts, workers, seed)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{num_workers}/{seed}".encode())
    for s in shards:
        h.update(f"\0{s.path}\0{s.rows}".encode())
    return h.hexdigest()


def pass_units(files: Sequence[Shard], pass_index: int, start_row: int = 0, stop_row: Optional[int] = None, *,
               window_rows: int = 0, seed: int = 0) -> list[dict]:
    """Read units covering rows [start_row, stop_row) of a worker's pass stream.

    The stream is the row groups of `files` in order, cut into windows of at least `window_rows`
    rows (whole row groups; 0 = one window per row group); with `window_rows` > 0 the rows of each
    window are permuted by a generator seeded with (seed, pass, window start), so a batch mixes
    rows from several row groups and files, and the order is still a pure function of the plan.
    A unit: {"pieces": JSON [[path, group, rows], ...], "pass", "row" (stream index of the
    window's first row), "skip" / "take" (rows of the window's order to drop, then keep),
    "shuffle", "seed"}.
    """
    import json

    windows: list[tuple[list, int]] = []  # (pieces, first row)
    pieces: list = []
    first, offset = 0, 0
    for shard in files:
        for group, rows in enumerate(shard.groups):
            if not pieces:
                first = offset
            pieces.append([shard.path, group, rows])
            offset += rows
            if offset - first >= max(1, window_rows):
                windows.append((pieces, first))
                pieces = []
    if pieces:
        windows.append((pieces, first))
    units = []
    for pieces, first in windows:
        end = first + sum(p[2] for p in pieces)
        lo, hi = max(start_row, first), end if stop_row is None else min(stop_row, end)
        if hi > lo:
            units.append({"pieces": json.dumps(pieces), "pass": pass_index, "row": first, "skip": lo - first,
                          "take": hi - lo, "shuffle": window_rows > 0, "seed": seed})
    return units


def split_rows(shards: Sequence[Shard], rank: int, world_size: int) -> list[dict]:
    """Read units of worker `rank`'s contiguous share of all rows of `shards`, in file order, not
    shuffled (evaluation: every row once over all workers)."""
    total = sum(s.rows for s in shards)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    return pass_units(shards, 0, lo, hi)


# ------------------------------------------------------------------------------------ preprocess
@dataclass(frozen=True)
class PreprocessSettings:
    image_size: int
    context_length: int = 77
    train: bool = True
    seed: int = 0
    crop_scale_min: float = 0.9
    decoder: str = "cv2"

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.decoder not in ("cv2", "pil"):
            raise ValueError(f"decoder {self.decoder!r}: expected 'cv2' (OpenCV) or 'pil' (Pillow)")


def crop_box(key: str, width: int, height: int, settings: PreprocessSettings, pass_index: int) -> tuple[int, int, int]:
    """(x, y, side) of the square crop for one row.

    Training: CLIP's augmentation, a random square covering a fraction in [crop_scale_min, 1] of the
    largest square's area, at a random place; the randomness is a hash of (seed, pass, key), so it
    differs between passes and is the same after a resume. Evaluation: the centred largest square.
    """
    short = min(width, height)
    if not settings.train:
        return (width - short) // 2, (height - short) // 2, short
    digest = hashlib.blake2b(f"{settings.seed}/{pass_index}/{key}".encode(), digest_size=12).digest()
    u = [int.from_bytes(digest[i:i + 4], "little") / 2 ** 32 for i in (0, 4, 8)]
    area = settings.crop_scale_min + (1.0 - settings.crop_scale_min) * u[0]
    side = max(1, min(short, int(round(short * area ** 0.5))))
    return int(u[1] * (width - side + 1)), int(u[2] * (height - side + 1)), side


class Preprocess:
    """One batch of shard rows -> model inputs (pure; no Ray).

    In: `key`, `caption`, `jpg` (encoded bytes) columns. Out: `image` uint8 [N, S, S, 3] (RGB),
    `tokens` int32 [N, context_length], `status` uint8 [N] (0 = usable, else an index into
    REJECT_REASONS), `key`. Rows are never dropped here, so positions stay exact; a row that fails
    to decode comes out black with its status set, and the Rebatcher drops and counts it.
    """

    def __init__(self, settings: PreprocessSettings):
        self.settings = settings
        if settings.decoder == "cv2":
            import cv2

            cv2.setNumThreads(1)  # one image per core: threads inside OpenCV only contend
            self._cv2 = cv2

    def __call__(self, batch: dict[str, Any], pass_index: int = 0) -> dict[str, np.ndarray]:
        from training.tokenizer import tokenize

        keys, captions, blobs = batch[KEY_COL], batch[CAPTION_COL], batch[IMAGE_COL]
        n, size = len(keys), self.settings.image_size
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        status = np.zeros(n, dtype=np.uint8)
        for i in range(n):
            status[i] = self._image(blobs[i], str(keys[i]), images[i], pass_index)
        texts = ["" if c is None else str(c) for c in captions]
        tokens = tokenize(texts, context_length=self.settings.context_length).numpy().astype(np.int32)
        return {"image": images, "tokens": tokens, "status": status, KEY_COL: np.asarray(keys, dtype=object)}

    def _image(self, blob: Any, key: str, out: np.ndarray, pass_index: int) -> int:
        if blob is None or len(blob) == 0:
            return REJECT_REASONS.index("no_image")
        try:
            if self.settings.decoder == "cv2":
                return self._cv2_image(blob, key, out, pass_index)
            return self._pil_image(blob, key, out, pass_index)
        except Exception:  # noqa: BLE001 - any decoder failure is a rejected row, counted by reason
            return REJECT_REASONS.index("not_an_image")

    def _cv2_image(self, blob: Any, key: str, out: np.ndarray, pass_index: int) -> int:
        cv2 = self._cv2
        img = cv2.imdecode(np.frombuffer(blob, dtype=np.uint8), cv2.IMREAD_COLOR)
        if img is None or img.size == 0:
            return REJECT_REASONS.index("not_an_image")
        height, width = img.shape[:2]
        x, y, side = crop_box(key, width, height, self.settings, pass_index)
        crop = img[y:y + side, x:x + side]
        size = self.settings.image_size
        if side != size:
            interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
            crop = cv2.resize(crop, (size, size), interpolation=interp)
        cv2.cvtColor(crop, cv2.COLOR_BGR2RGB, dst=out)
        return 0

    def _pil_image(self, blob: Any, key: str, out: np.ndarray, pass_index: int) -> int:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(blob)) as img:
            size = self.settings.image_size
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when much larger
            img = img.convert("RGB")
            x, y, side = crop_box(key, img.width, img.height, self.settings, pass_index)
            img = img.resize((size, size), Image.BICUBIC, box=(x, y, x + side, y + side))
            out[...] = np.asarray(img)
        return 0


class ShardReader:
    """The map_batches UDF: read units -> preprocessed rows, in stream order.

    Reads a unit's row groups with pyarrow (only the needed columns), puts them in the unit's
    order (a seeded permutation for training windows), drops `skip` rows before decoding, keeps
    `take`, runs `Preprocess` on batches of `rows_per_batch` and adds `pass` and `row` (each row's
    index in its worker's pass stream) for the data position.
    """

    def __init__(self, settings: PreprocessSettings, filesystem: Any = None, rows_per_batch: int = 64):
        self.preprocess = Preprocess(settings)
        self.filesystem = filesystem
        self.rows_per_batch = rows_per_batch
        self._files: OrderedDict = OrderedDict()

    def _file(self, path: str):
        import pyarrow.parquet as pq

        if path not in self._files:
            handle = self.filesystem.open_input_file(path) if self.filesystem is not None else path
            self._files[path] = pq.ParquetFile(handle)
            while len(self._files) > 8:
                self._files.popitem(last=False)
        self._files.move_to_end(path)
        return self._files[path]

    def read(self, unit: dict) -> Iterator[dict[str, np.ndarray]]:
        """Preprocessed batches of one unit."""
        import json

        import pyarrow as pa

        pieces = json.loads(unit["pieces"]) if isinstance(unit["pieces"], str) else unit["pieces"]
        table = pa.concat_tables([self._file(path).read_row_group(int(group), columns=list(REQUIRED_COLUMNS))
                                  for path, group, _ in pieces])
        first, skip, take = int(unit["row"]), int(unit["skip"]), int(unit["take"])
        pass_index = int(unit["pass"])
        if bool(unit["shuffle"]):
            order = np.random.default_rng([int(unit["seed"]), pass_index, first]).permutation(table.num_rows)
        else:
            order = np.arange(table.num_rows)
        order = order[skip:skip + take]
        for start in range(0, len(order), self.rows_per_batch):
            part = table.take(order[start:start + self.rows_per_batch])
            columns = {name: part.column(name).to_numpy(zero_copy_only=False) for name in REQUIRED_COLUMNS}
            out = self.preprocess(columns, pass_index)
            k = part.num_rows
            out["pass"] = np.full(k, pass_index, dtype=np.int32)
            out["row"] = np.arange(first + skip + start, first + skip + start + k, dtype=np.int64)
            yield out

    def __call__(self, units: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(units["pieces"])):
            yield from self.read({k: v[i] for k, v in units.items()})


# ------------------------------------------------------------------------------------- rebatcher
@dataclass
class DataPosition:
    """Where a worker is in its stream: `rows` rows of its share of pass `pass_index` consumed."""

    pass_index: int = 0
    rows: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"pass": self.pass_index, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "DataPosition":
        return cls(int(d["pass"]), int(d["rows"]))


@dataclass
class Batch:
    images: Any  # torch uint8 [B, S, S, 3]
    tokens: Any  # torch int32 [B, L]
    position: DataPosition  # just past this batch's last row
    keys: list = field(default_factory=list)


class Rebatcher:
    """Cuts a stream of preprocessed row batches into exact `batch_size` batches of usable rows.

    Rows with a nonzero `status` are dropped and counted in `rejected` by reason. Every output
    batch carries the position just past its last row (from the `pass` and `row` columns). Works
    on torch tensors (what iter_torch_batches yields).
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.rejected: Counter = Counter()
        self._parts: list[tuple[Any, Any, list, Any, Any]] = []  # images, tokens, keys, pass, row
        self._buffered = 0

    def add(self, batch: dict[str, Any]) -> list[Batch]:
        import torch

        images, tokens = batch["image"], batch["tokens"]
        status = torch.as_tensor(batch["status"])
        passes, rows = torch.as_tensor(batch["pass"]), torch.as_tensor(batch["row"])
        keys = list(batch.get(KEY_COL, []))
        bad = status != 0
        if bool(bad.any()):
            codes, counts = torch.unique(status[bad], return_counts=True)
            for code, count in zip(codes.tolist(), counts.tolist()):
                self.rejected[REJECT_REASONS[code]] += count
            keep = torch.nonzero(~bad).flatten()
            images, tokens, passes, rows = images[keep], tokens[keep], passes[keep], rows[keep]
            keys = [keys[i] for i in keep.tolist()] if keys else []
        if len(rows) == 0:
            return []
        if not self._parts and len(rows) == self.batch_size:  # the common case: no copy
            return [Batch(images, tokens, DataPosition(int(passes[-1]), int(rows[-1]) + 1), keys)]
        self._parts.append((images, tokens, keys, passes, rows))
        self._buffered += len(rows)
        out = []
        while self._buffered >= self.batch_size:
            out.append(self._take(self.batch_size))
        return out

    def _take(self, n: int) -> Batch:
        import torch

        images, tokens, keys = [], [], []
        last = None
        need = n
        while need:
            im, tk, ky, ps, rw = self._parts[0]
            k = min(need, len(rw))
            images.append(im[:k]), tokens.append(tk[:k]), keys.extend(ky[:k])
            last = (int(ps[k - 1]), int(rw[k - 1]) + 1)
            if k == len(rw):
                self._parts.pop(0)
            else:
                self._parts[0] = (im[k:], tk[k:], ky[k:], ps[k:], rw[k:])
            need -= k
        self._buffered -= n
        cat = (lambda xs: xs[0]) if len(images) == 1 else torch.cat
        return Batch(cat(images), cat(tokens), DataPosition(*last), keys)


# ----------------------------------------------------------------------------------- Ray stream
@dataclass
class StreamSettings:
    """How one Train worker reads: its preprocessing actors and the batch sizes."""

    local_batch: int
    preprocess: PreprocessSettings
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    rows_per_batch: int = 64
    prefetch_batches: int = 2
    pin_memory: bool = False
    data_cpus: Optional[float] = None  # Ray Data CPU limit for this worker's executor
    max_units: int = 4096  # read units per Dataset (a longer run chains Datasets)
    shuffle_rows: int = 4096  # rows per shuffle window (0: file order within each pass)


def _collate_fn():
    """numpy batch -> torch tensors without copies (keys stay a Python list)."""
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            import warnings

            with warnings.catch_warnings():
                # Arrays from the object store are read-only; nothing writes into these tensors
                # (they are indexed, concatenated or moved to the device, all of which copy).
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                out = {name: torch.from_numpy(batch[name]) for name in ("image", "tokens", "status", "pass", "row")}
            out[KEY_COL] = list(batch[KEY_COL])
            return out

    return Collate()


def configure_data_context(settings: StreamSettings) -> None:
    """Ray Data settings of this process: ordered output (deterministic streams), no progress
    bars, and a CPU limit so the Train workers' executors share the cluster without starving."""
    from ray.data import ExecutionResources

    from ray_compat import data_context, disable_progress_bars

    ctx = data_context()
    ctx.execution_options.preserve_order = True
    disable_progress_bars(ctx)
    ctx.print_on_execution_start = False
    if settings.data_cpus is not None:
        ctx.execution_options.resource_limits = ExecutionResources(cpu=settings.data_cpus)


def units_dataset(units: list[dict], filesystem: Any, settings: StreamSettings, preprocess: PreprocessSettings):
    """from_items(units, one per block) -> map_batches(ShardReader) on an actor pool, in order."""
    import ray

    ds = ray.data.from_items(units, override_num_blocks=len(units))
    return ds.map_batches(
        ShardReader, fn_constructor_kwargs={"settings": preprocess, "filesystem": filesystem,
                                            "rows_per_batch": settings.rows_per_batch},
        batch_size=1, batch_format="numpy", num_cpus=settings.cpus_per_actor,
        # No more actors than read units: a short segment or validation set would start idle ones.
        compute=ray.data.ActorPoolStrategy(size=max(1, min(settings.num_actors, len(units)))))


class ShardStream:
    """This worker's exact batches, pass after pass, from `start` on (iterate once).

    A background thread runs the Ray Dataset(s) and feeds a bounded queue; `data_wait_s`
    accumulates the time the trainer waited for a batch.
    """

    def __init__(self, shards: Sequence[Shard], filesystem: Any, *, rank: int, world_size: int, seed: int,
                 start: DataPosition, settings: StreamSettings, rows_needed: Optional[int] = None,
                 max_passes: Optional[int] = None):
        if not shards:
            raise ValueError("no shards to read")
        self.shards, self.filesystem = list(shards), filesystem
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_position, self.settings = start, settings
        self.rows_needed, self.max_passes = rows_needed, max_passes
        self.rebatcher = Rebatcher(settings.local_batch)
        self.data_wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, settings.prefetch_batches))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def files_of_pass(self, pass_index: int) -> list[Shard]:
        return plan_pass(self.shards, self.world_size, self.seed, pass_index)[self.rank]

    def segments(self) -> Iterator[list[dict]]:
        """Lists of read units, at most `max_units` each, from `start` on. Ends after `max_passes`
        passes, or one pass beyond `rows_needed` rows (a margin for rejected rows), else never."""
        pass_index, start_row = self.start_position.pass_index, self.start_position.rows
        planned, segment = 0, []
        while self.max_passes is None or pass_index < self.start_position.pass_index + self.max_passes:
            units = pass_units(self.files_of_pass(pass_index), pass_index, start_row,
                               window_rows=self.settings.shuffle_rows, seed=self.seed)
            segment.extend(units)
            planned += sum(u["take"] for u in units)
            pass_index, start_row = pass_index + 1, 0
            if self.rows_needed is not None and planned >= self.rows_needed + 1:
                # One more pass as margin for rejected rows, then stop planning.
                segment.extend(pass_units(self.files_of_pass(pass_index), pass_index,
                                          window_rows=self.settings.shuffle_rows, seed=self.seed))
                break
            if len(segment) >= self.settings.max_units:
                yield segment
                segment = []
        if segment:
            yield segment

    def _produce(self) -> None:
        try:
            for units in self.segments():
                if self._stop.is_set():
                    return
                ds = units_dataset(units, self.filesystem, self.settings, self.settings.preprocess)
                for part in ds.iter_torch_batches(batch_size=self.settings.local_batch, collate_fn=_collate_fn(),
                                                  prefetch_batches=self.settings.prefetch_batches,
                                                  pin_memory=self.settings.pin_memory):
                    for batch in self.rebatcher.add(part):
                        if not self._put(batch):
                            return
            self._put(StopIteration())
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(exc)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def start(self) -> "ShardStream":
        """Start reading (the actors start up) before the first batch is asked for."""
        if self._thread is None:
            configure_data_context(self.settings)
            self._thread = threading.Thread(target=self._produce, name="shard-stream", daemon=True)
            self._thread.start()
        return self

    def __iter__(self) -> Iterator[Batch]:
        self.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = self._queue.get()
                self.data_wait_s += time.perf_counter() - t0
                if isinstance(item, StopIteration):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            # The producer leaves as soon as its pending read returns (a daemon thread either way).
            self._thread.join(timeout=2)


def eval_dataset(shards: Sequence[Shard], filesystem: Any, *, rank: int, world_size: int,
                 settings: StreamSettings, preprocess: PreprocessSettings):
    """This worker's contiguous share of an evaluation set, preprocessed (centre crops) and
    materialised in the object store, to iterate at every validation. None for an empty share."""
    units = split_rows(shards, rank, world_size)
    if not units:
        return None
    configure_data_context(settings)
    return units_dataset(units, filesystem, settings, preprocess).materialize()


def iter_eval_batches(dataset, batch_size: int) -> Iterator[dict[str, Any]]:
    """Usable rows of a materialised evaluation share as torch batches (image, tokens, key)."""
    if dataset is None:
        return
    import torch

    for part in dataset.iter_torch_batches(batch_size=batch_size, collate_fn=_collate_fn()):
        ok = part["status"] == 0
        if not bool(ok.all()):
            idx = torch.nonzero(ok).flatten()
            part = {"image": part["image"][idx], "tokens": part["tokens"][idx],
                    KEY_COL: [part[KEY_COL][i] for i in idx.tolist()]}
        if len(part[KEY_COL]):
            yield part
