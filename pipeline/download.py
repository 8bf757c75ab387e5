"""Download, check, resize and write one shard: the work of one download actor call.

`ShardDownloader.process(spec)` reads the shard's staged input rows and runs each row through
caption filters -> fetch -> header checks -> size filters -> resize/encode, and commits the shard:
its accepted rows, its rejects and, when the global pass needs it, its dedup index, then the marker
with the shard's counts. Every input row ends either accepted or in the rejects table with a stage
and a reason; an unexpected exception on one row becomes an `internal_error` reject, never a lost
row or a crash.

Inside an actor: a feeder thread per shard hands rows to the fetcher (`pipeline.fetch`: one network
thread, libcurl, any number of requests in flight), slow hosts first (`feed_order`), while at most
`data.max_in_flight` rows are between the start of their request and the end of their decode;
`data.threads_per_actor` decoder threads take the downloaded bodies (decoding, resizing and hashing release the GIL, so they run
beside the network thread); `in_order.InOrder` hands the rows back in row order.

No Ray here: the runner wraps this class in a Ray Data actor pool.
"""

from __future__ import annotations

import functools
import hashlib
import queue
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import pyarrow as pa

from pipeline.address_guard import AddressGuard, Resolver, system_resolver
from pipeline.config import BLUR_BOXES, EXPECTED_HASH, LOCAL_IMAGE, DataConfig
from pipeline.eligibility import table_rejections
from pipeline.feed_order import FeedOrder
from pipeline.fetch import FetchResult, Fetcher
from pipeline.filters import RowFilters
from pipeline.local_files import LocalFiles, served_locally
from pipeline.http.proxies import ProxySettings
from pipeline.in_order import Gauge, InOrder, Permits
from pipeline.reasons import DECODE, DEDUP, DOWNLOAD, FILTER, Rejection
from pipeline.resize import ImageProcessor, ImageReject
from pipeline.resume import DOWNLOAD as DOWNLOAD_PHASE
from pipeline.resume import ShardSpec, marker
from pipeline.thread_names import name_os_thread
from pipeline.shards import INDEX_SCHEMA, accepted_schema, make_keys, redact_userinfo_column, rejects_table
from storage import Folder


@dataclass
class StoredImage:
    """A row's image as stored: encoded bytes, sizes, sha256 of the bytes; `downloaded_bytes` of
    the original response (for the shard's stats)."""

    jpg: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str
    downloaded_bytes: int


RowOutcome = Union[StoredImage, Rejection]
ROW_GROUP_ROWS = 512  # accepted rows per Parquet row group (about 15 MB of 256 px JPEGs)
LEAD_PER_PERMIT = 8  # a slow host's rows are requested at most 8 x data.max_in_flight rows early


def image_processor(data: DataConfig) -> ImageProcessor:
    return ImageProcessor(
        image_size=data.image_size,
        resize_mode=data.resize_mode,
        resize_only_if_bigger=data.resize_only_if_bigger,
        upscale_interpolation=data.upscale_interpolation,
        downscale_interpolation=data.downscale_interpolation,
        encode_format=data.encode_format,
        encode_quality=data.encode_quality,
        min_image_size=data.min_image_size,
        max_image_area=data.max_image_area,
        max_pixels=data.max_pixels,
        max_decoded_bytes=data.max_decoded_bytes,
        fast_jpeg_decode=data.fast_jpeg_decode,
    )


def fetcher(
    data: DataConfig,
    resolver: Resolver = system_resolver,
    permits: Optional[Permits] = None,
    busy: Optional[Gauge] = None,
) -> Fetcher:
    return Fetcher(
        guard=AddressGuard.for_data(data, resolver),
        timeout_s=data.timeout_s,
        retries=data.retries,
        retry_backoff_s=data.retry_backoff_s,
        max_redirects=data.max_redirects,
        max_response_bytes=data.max_response_bytes,
        user_agent=data.user_agent,
        user_agent_token=data.user_agent_token,
        disallowed_header_directives=data.disallowed_header_directives,
        max_connections_per_host=data.max_connections_per_host,
        skip_host_after_failures=data.skip_host_after_failures,
        skip_host_for_s=data.skip_host_for_s,
        max_retry_after_s=data.max_retry_after_s,
        reuse_connections=data.reuse_connections,
        proxies=ProxySettings.from_environment(),  # the actor's environment: the network it runs on
        permits=permits,
        busy=busy,
    )


class RowProcessor:
    """One row from its fetched response to a stored image or a rejection; thread-safe."""

    def __init__(
        self,
        data: DataConfig,
        resolver: Resolver = system_resolver,
        cpu_slots: Optional[int] = None,
        permits: Optional[Permits] = None,
        busy: Optional[Gauge] = None,
        column_cuts: Optional[dict[str, float]] = None,
    ):
        # At most `cpu_slots` threads decode at once: the actor holds that many CPUs, and more
        # concurrent decoders only add context switches and cache misses (downloads go on meanwhile).
        # One slot is a plain Lock: a C lock, where a Semaphore is Python code over a Condition.
        self.cpu_slots = (
            None if not cpu_slots else threading.Lock() if cpu_slots == 1 else threading.BoundedSemaphore(cpu_slots)
        )
        self.filters = RowFilters(data.filters, column_cuts)
        self.fetcher = fetcher(data, resolver, permits, busy)
        self.images = image_processor(data)
        self.verify = data.verify_hash

    def outcome(
        self, result: FetchResult, expected_hash: Optional[str] = None, blur_boxes: Optional[list] = None
    ) -> RowOutcome:
        """result: the fetch of an eligible row's URL (`eligibility.py` rejects the others before any
        request); expected_hash: the row's data.verify_hash.column value (when that check is on);
        blur_boxes: its data.bbox_col boxes to blur."""
        stage = DOWNLOAD
        try:
            if result.reason is not None:
                return Rejection(DOWNLOAD, result.reason, result.detail)
            if self.verify is not None:
                rejection = self.hash_check(result.body, expected_hash)
                if rejection is not None:
                    return rejection
            stage = DECODE
            try:
                probed = self.images.probe(result.body)
            except ImageReject as rej:
                return Rejection(rej.stage, rej.reason, rej.detail)
            stage = FILTER
            rejection = self.filters.image(probed.width, probed.height)
            if rejection is not None:
                return rejection
            stage = DECODE
            try:
                if self.cpu_slots is None:
                    resized = self.images.resize(probed, blur_boxes)
                else:
                    with self.cpu_slots:
                        resized = self.images.resize(probed, blur_boxes)
            except ImageReject as rej:
                return Rejection(rej.stage, rej.reason, rej.detail)
            return StoredImage(
                resized.data,
                resized.width,
                resized.height,
                resized.original_width,
                resized.original_height,
                hashlib.sha256(resized.data).hexdigest(),
                len(result.body),
            )
        except Exception as exc:  # noqa: BLE001 - one bad row must not take the shard down
            tb = traceback.format_exc(limit=6)
            return Rejection(stage, "internal_error", f"{type(exc).__name__}: {exc}\n{tb}")

    def hash_check(self, body: bytes, expected: Optional[str]) -> Optional[Rejection]:
        """img2dataset's verify_hash: the downloaded bytes must hash to the input's value."""
        name, column = self.verify.algorithm, self.verify.column
        if not expected:
            return Rejection(DOWNLOAD, "hash_mismatch", f"no expected {name} in the input column {column!r}")
        got = hashlib.new(name, body).hexdigest()
        if got != expected:
            return Rejection(
                DOWNLOAD,
                "hash_mismatch",
                f"{name} of the downloaded bytes is {got}, the input column {column!r} says {expected}",
            )
        return None

    def close(self) -> None:
        self.fetcher.close()


class ShardDownloader:
    """Processes whole shards: one fetcher, `data.threads_per_actor` decoder threads and at most
    `data.max_in_flight` rows in progress, shared by the shards the actor runs at once."""

    def __init__(
        self,
        data: DataConfig,
        out: Folder,
        extra_schema: pa.Schema,
        resolver: Resolver = system_resolver,
        cpu_slots: Optional[int] = None,
        column_cuts: Optional[dict[str, float]] = None,
    ):
        self.data = data
        self.out = out
        self.extra_schema = extra_schema
        # A row holds a permit from the start of its request to the end of its decode, so the
        # bodies waiting for a decoder are bounded too (the network outruns decoding on a fast link);
        # not while it waits for its host's turn or a retry (a slow host's backlog must not starve
        # the other hosts' requests). A waiting row whose turn comes takes one before its transfer
        # starts, or waits for one (`Fetcher`'s permits).
        self.in_flight = Permits(data.max_in_flight, batch=max(1, data.max_in_flight // 16))
        # transfers under way plus bodies not yet decoded; its peak is at most data.max_in_flight
        self.busy = Gauge()
        self.rows = RowProcessor(data, resolver, cpu_slots, self.in_flight, self.busy, column_cuts=column_cuts)
        self.local_files = LocalFiles(data.local_root, data.max_response_bytes) if data.local_root else None
        self.fetched: queue.SimpleQueue = queue.SimpleQueue()  # (rows, j, result, hash, boxes); None: stop
        self.decoders = [
            threading.Thread(target=self._decode_loop, name=f"decode-{k}", daemon=True)
            for k in range(data.threads_per_actor)
        ]
        for thread in self.decoders:
            thread.start()

    def close(self) -> None:
        for _ in self.decoders:
            self.fetched.put(None)
        for thread in self.decoders:
            thread.join()
        self.rows.close()

    def iter_outcomes(self, table: pa.Table, duplicates: Optional[dict[int, str]] = None) -> Iterator[RowOutcome]:
        """One outcome per row of a staged input table (columns url, caption, caption_ok,
        source_error and, with data.verify_hash / data.bbox_col, expected_hash / blur_boxes), in
        row order, each as soon as it and all rows before it are done.

        Decided without a request: the rows `eligibility.table_rejections` rejects (malformed,
        caption filters, empty URL), and `duplicates` ({row: key of the first row with the same
        url and caption}, from the run's pair dedup, which saw exactly the eligible rows)."""
        urls = table.column("url").to_pylist()
        duplicates = duplicates or {}
        early: dict[int, Rejection] = {}
        todo = []
        for i, rejection in enumerate(table_rejections(table, self.rows.filters)):
            if rejection is None and i in duplicates:
                rejection = Rejection(DEDUP, "duplicate", f"same url and caption as key {duplicates[i]}")
            if rejection is not None:
                early[i] = rejection
            else:
                todo.append(i)
        columns = [[urls[i] for i in todo]]
        # RowProcessor.outcome's optional arguments, in order, then the staged image (WebDataset input)
        for optional in (EXPECTED_HASH, BLUR_BOXES, LOCAL_IMAGE):
            if optional in table.column_names:
                values = table.column(optional).to_pylist()
                columns.append([values[i] for i in todo])
            else:
                columns.append([None] * len(todo))
        rows = list(zip(*columns))
        results: InOrder[RowOutcome] = InOrder(len(rows))
        if rows:
            threading.Thread(target=self._feed, args=(results, rows), name="feed", daemon=True).start()
        fetched = iter(results)
        try:
            for i in range(table.num_rows):
                yield early[i] if i in early else next(fetched)
        finally:
            results.close()  # an abandoned shard: its rows not yet started are not fetched

    def _feed(self, results: InOrder, rows: list[tuple]) -> None:
        """Start the rows' requests as permits free up, a batch at a time, slow hosts first
        (`feed_order`; the shard's feeder thread)."""
        name_os_thread()
        try:
            order = FeedOrder([row[0] for row in rows], max_lead=LEAD_PER_PERMIT * self.data.max_in_flight)
            while len(order):
                got = self.in_flight.take(len(order))
                if results.closed:
                    self.in_flight.give(got)
                    return
                batch = []
                for k in order.take(got):
                    url, expected_hash, blur_boxes, local_image = rows[k]
                    done = functools.partial(self._fetched, results, order, k, expected_hash, blur_boxes)
                    here = served_locally(url, local_image, self.local_files)  # WebDataset input, local_root
                    if here is not None:
                        done(here)
                    else:
                        batch.append((url, done))
                if batch:
                    self.rows.fetcher.submit_many(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            results.fail(exc)

    def _fetched(self, results: InOrder, order: FeedOrder, j, expected_hash, blur_boxes, result: FetchResult) -> None:
        """On the network thread: hand the response to the decoders."""
        order.finished(j)
        self.busy.up()
        self.fetched.put((results, j, result, expected_hash, blur_boxes))

    def _decode_loop(self) -> None:
        """A decoder thread: responses to row outcomes, until close()."""
        name_os_thread()
        while True:
            item = self.fetched.get()
            if item is None:
                return
            results, j, result, expected_hash, blur_boxes = item
            try:
                if not results.closed:
                    results.put(j, self.rows.outcome(result, expected_hash, blur_boxes))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                results.fail(exc)
            finally:
                self.busy.down()
                self.in_flight.give()

    def process(self, spec: ShardSpec, duplicates: Optional[dict[int, str]] = None) -> dict[str, Any]:
        """Download and commit one shard; returns the stats written to its marker.

        duplicates: {row: first key} of the shard's rows that repeat an earlier (url, caption);
        they are rejected as `dedup/duplicate` without being fetched.

        Accepted rows are written in row order, a row group at a time, as soon as they and the
        rows before them are done (memory for encoded images is reused instead of growing)."""
        start = time.time()
        out = self.out
        # Whatever an interrupted attempt at this shard left behind goes first, so a file this
        # attempt does not write (say, no rejects this time) cannot survive from the last one.
        out.remove([spec.accepted_file, spec.rejects_file, spec.index_file, marker(DOWNLOAD_PHASE, spec)])
        table = out.read_arrow(spec.input)
        if table.num_rows != spec.rows:
            raise RuntimeError(f"{spec.input} has {table.num_rows} rows, the plan says {spec.rows}")
        schema = accepted_schema(self.extra_schema)
        sink = None
        rejected: dict[int, Rejection] = {}
        batch_rows: list[int] = []
        batch_images: list[StoredImage] = []
        index_parts: list[pa.Table] = []
        accepted = downloaded = 0

        def flush() -> None:
            nonlocal sink
            if not batch_rows:
                return
            idx = pa.array(batch_rows, pa.int64())
            keys = make_keys(spec.name, batch_rows, spec.row_digits)
            columns = {
                "key": keys,
                "url": redact_userinfo_column(table.column("url").take(idx)),
                "caption": table.column("caption").take(idx),
                "jpg": pa.array([im.jpg for im in batch_images], pa.binary()),
                "width": pa.array([im.width for im in batch_images], pa.int32()),
                "height": pa.array([im.height for im in batch_images], pa.int32()),
                "original_width": pa.array([im.original_width for im in batch_images], pa.int32()),
                "original_height": pa.array([im.original_height for im in batch_images], pa.int32()),
                "sha256": pa.array([im.sha256 for im in batch_images], pa.string()),
            }
            for field in self.extra_schema:
                columns[field.name] = table.column(field.name).take(idx).cast(field.type)
            if sink is None:
                sink = out.parquet_sink(spec.accepted_file, schema, ROW_GROUP_ROWS)
            sink.write(pa.table(columns, schema=schema))
            if spec.global_pass:
                index_parts.append(pa.table({"key": keys, "sha256": columns["sha256"]}, schema=INDEX_SCHEMA))
            batch_rows.clear()
            batch_images.clear()

        try:
            for i, outcome in enumerate(self.iter_outcomes(table, duplicates)):
                if isinstance(outcome, StoredImage):
                    batch_rows.append(i)
                    batch_images.append(outcome)
                    accepted += 1
                    downloaded += outcome.downloaded_bytes
                    if len(batch_rows) >= ROW_GROUP_ROWS:
                        flush()
                else:
                    rejected[i] = outcome
            flush()
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        stats: dict[str, Any] = {
            "shard": spec.name,
            "rows": spec.rows,
            "accepted": accepted,
            "rejected": len(rejected),
            "reasons": dict(Counter(r.reason for r in rejected.values())),
            "stages": dict(Counter(r.stage for r in rejected.values())),
            "downloaded_bytes": downloaded,
            "accepted_file": None,
            "accepted_bytes": 0,
            "rejects_file": None,
        }
        if sink is not None:
            stats["accepted_bytes"] = sink.close()
            stats["accepted_file"] = spec.accepted_file
            if spec.global_pass:
                out.write_parquet(spec.index_file, pa.concat_tables(index_parts), row_group_rows=65_536)
        if rejected:
            order = sorted(rejected)
            idx = pa.array(order, pa.int64())
            rejects = rejects_table(
                make_keys(spec.name, order, spec.row_digits),
                table.column("url").take(idx),
                table.column("caption").take(idx),
                [rejected[i] for i in order],
            )
            out.write_parquet(spec.rejects_file, rejects)
            stats["rejects_file"] = spec.rejects_file
        stats["duration_s"] = round(time.time() - start, 3)
        out.write_json(marker(DOWNLOAD_PHASE, spec), stats)  # the commit
        return stats
