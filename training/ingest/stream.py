"""Ray Data wiring of the training ingest: one Dataset per worker for the whole run.

`ShardStream` runs `from_items(read units)` -> `map_batches(ShardReader)` on a pool of CPU actors
(any node, rows kept in order) -> `iter_torch_batches` with prefetch, in a background thread, and
hands the training loop exact batches with their data position (docs/training.md).
`eval_dataset` / `iter_eval_batches` read a worker's share of a held-out set the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from training.ingest.batches import Batch, DataPosition, Rebatcher
from training.ingest.passes import PassPlanner, PassState, split_rows
from training.ingest.plan import Shard
from training.ingest.preprocess import KEY_COL, PreprocessSettings
from training.ingest.read import ShardReader

log = logging.getLogger(__name__)


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
    source_weights: tuple[float, ...] = ()  # train.data's weighted sources (mixture.py); (): one source


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
        ShardReader,
        fn_constructor_kwargs={
            "settings": preprocess,
            "filesystem": filesystem,
            "rows_per_batch": settings.rows_per_batch,
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=settings.cpus_per_actor,
        # No more actors than read units: a short segment or validation set would start idle ones.
        compute=ray.data.ActorPoolStrategy(size=max(1, min(settings.num_actors, len(units)))),
    )


class ShardStream:
    """This worker's exact batches, pass after pass, from `start` on (iterate once).

    A background thread runs the Ray Dataset(s) and feeds a bounded queue; `data_wait_s`
    accumulates the time the trainer waited for a batch.
    """

    def __init__(
        self,
        shards: Sequence[Shard],
        filesystem: Any,
        *,
        rank: int,
        world_size: int,
        seed: int,
        start: DataPosition,
        settings: StreamSettings,
        rows_needed: Optional[int] = None,
        max_passes: Optional[int] = None,
        bases: Optional[dict[int, PassState]] = None,
    ):
        if not shards:
            raise ValueError("no shards to read")
        self.shards, self.filesystem = list(shards), filesystem
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.planner = PassPlanner(
            shards,
            seed=seed,
            shuffle_rows=settings.shuffle_rows,
            num_workers=world_size,
            weights=settings.source_weights,
            bases=bases,
        )
        self.start_position, self.settings = start, settings
        self.rows_needed, self.max_passes = rows_needed, max_passes
        self.rebatcher = Rebatcher(settings.local_batch)
        self.data_wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, settings.prefetch_batches))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def segments(self) -> Iterator[list[dict]]:
        """Lists of read units, at most `max_units` each, from `start` on. Ends after `max_passes`
        passes, or one pass beyond `rows_needed` rows (a margin for rejected rows), else never."""
        pass_index, start_row = self.start_position.pass_index, self.start_position.rows
        planned, segment = 0, []
        while self.max_passes is None or pass_index < self.start_position.pass_index + self.max_passes:
            units = self.planner.units(pass_index, self.rank, start_row)
            segment.extend(units)
            planned += sum(u["take"] for u in units)
            pass_index, start_row = pass_index + 1, 0
            if self.rows_needed is not None and planned >= self.rows_needed + 1:
                # One more pass as margin for rejected rows, then stop planning.
                segment.extend(self.planner.units(pass_index, self.rank))
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
                for part in ds.iter_torch_batches(
                    batch_size=self.settings.local_batch,
                    collate_fn=_collate_fn(),
                    prefetch_batches=self.settings.prefetch_batches,
                    pin_memory=self.settings.pin_memory,
                ):
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


def eval_dataset(
    shards: Sequence[Shard],
    filesystem: Any,
    *,
    rank: int,
    world_size: int,
    settings: StreamSettings,
    preprocess: PreprocessSettings,
):
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
            part = {
                "image": part["image"][idx],
                "tokens": part["tokens"][idx],
                KEY_COL: [part[KEY_COL][i] for i in idx.tolist()],
            }
        if len(part[KEY_COL]):
            yield part
