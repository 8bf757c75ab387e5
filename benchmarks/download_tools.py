"""The download benchmarks' contestants and their bar: img2dataset's `download()` and clipray's
`run_pipeline` as whole calls on a Parquet URL list (columns `url`, `caption`), each timed and
counted per reject reason, and the CPU-bound ceiling (decode + resize + encode on one core).
`benchmarks/download.py` (one zero-latency server) and `benchmarks/download_internet.py` (the
internet emulator) both run these.

Each runner takes `mark`, called right before and right after the timed call (see
`cpu_accounting.measured`), and returns a dict with `wall_s`, `accepted`, `images_per_s`,
`in_shard_images_per_s` (first shard's start to last shard's end), `reasons` ({reason: rows}, in
clipray's reason codes) and `workers` (how many download processes to count as workers).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from benchmarks.cpu_accounting import cmdline, descendants, proc_table


def cpu_ceiling(images: list[bytes], image_size: int, seconds: float = 6.0, rounds: int = 4) -> dict[str, float]:
    """Images/s on one core, the best of `rounds`: plain OpenCV (full decode, INTER_AREA, border
    pad, encode q95), and clipray's own decode path for comparison."""
    import cv2
    import numpy as np

    from pipeline.resize import ImageProcessor

    cv2.setNumThreads(1)

    def opencv(data: bytes) -> bytes:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        s = image_size / max(h, w)
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
        top, left = (image_size - h) // 2, (image_size - w) // 2
        img = cv2.copyMakeBorder(
            img, top, image_size - h - top, left, image_size - w - left, cv2.BORDER_CONSTANT, value=(255, 255, 255)
        )
        return cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), 95])[1].tobytes()

    ours = ImageProcessor(image_size=image_size, resize_mode="border")
    rates = {}
    for name, fn in (("opencv", opencv), ("clipray", lambda d: ours.resize(ours.probe(d)).data)):
        fn(images[0])
        best = 0.0
        for _ in range(rounds):  # the best round: the ceiling is not lowered by a noisy moment
            start_cpu, count = time.process_time(), 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                fn(images[count % len(images)])
                count += 1
            best = max(best, count / (time.process_time() - start_cpu))  # per CPU-second: per core
        rates[name] = best
    return rates


# img2dataset's error_message (str() of the exception urllib raised) -> clipray's reason code
_IMG2DATASET_REASONS = (
    (re.compile(r"HTTP Error (\d{3})"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed out", re.IGNORECASE), lambda m: "timeout"),
    (
        re.compile(r"reset by peer|Remote end closed|Connection refused|IncompleteRead|Broken pipe", re.IGNORECASE),
        lambda m: "connection_error",
    ),
    (re.compile(r"Name or service not known|Temporary failure in name resolution"), lambda m: "dns_error"),
    (re.compile(r"redirect", re.IGNORECASE), lambda m: "too_many_redirects"),
)


def img2dataset_reason(status: str, error_message: Optional[str]) -> str:
    """The clipray reason code for one img2dataset row that failed; `other: <message>` when none fits."""
    if status == "failed_to_resize":
        return "decode_error"
    message = error_message or ""
    for pattern, code in _IMG2DATASET_REASONS:
        match = pattern.search(message)
        if match:
            return code(match)
    return f"other: {message[:80]}"


def img2dataset_rejects(out: Path) -> dict[str, int]:
    """{reason: rows} of the rows img2dataset did not keep, read from its Parquet shards."""
    import pyarrow.parquet as pq

    counts: Counter = Counter()
    for path in sorted(out.glob("*.parquet")):
        table = pq.read_table(path, columns=["status", "error_message"]).to_pydict()
        for status, message in zip(table["status"], table["error_message"]):
            if status != "success":
                counts[img2dataset_reason(status, message)] += 1
    return dict(sorted(counts.items()))


def run_img2dataset(url_list: Path, out: Path, mark: Callable[[], None], **options: Any) -> dict:
    """`img2dataset.download` on `url_list` into `out` (Parquet shards), with `options` (any of its
    arguments; those left out keep img2dataset's defaults) on top of the list's layout."""
    import inspect
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from img2dataset import download

    workers = options.get("processes_count", inspect.signature(download).parameters["processes_count"].default)
    mark()
    start = time.perf_counter()
    download(
        url_list=str(url_list),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="parquet",
        output_folder=str(out),
        enable_wandb=False,
        **options,
    )
    wall = time.perf_counter() - start
    mark()
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    ok = sum(s["successes"] for s in stats)
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return {
        "wall_s": wall,
        "accepted": ok,
        "images_per_s": ok / wall,
        "in_shard_images_per_s": ok / span,
        "reasons": img2dataset_rejects(out),
        "workers": workers,
    }


class _Identity:
    def __call__(self, batch):
        return batch


def warm_ray_data() -> None:
    """A tiny Ray Data job on an actor pool, before the timed call: it starts Ray Data's
    per-cluster service actors (_StatsActor, AutoscalingCoordinator, ActorLocationTracker: detached,
    created by the first Data job on a cluster and kept), as on any cluster that has run a Data job
    before. Each is a Python process importing Ray Data: ~2 CPU-s apiece, ~6 CPU-s of a 20k-URL run
    when counted in (`--cold-ray`). Our download actors still start inside the timed call."""
    import ray

    ray.data.range(2, override_num_blocks=1).map_batches(
        _Identity, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1
    ).materialize()
    # Its actor exits afterwards (~0.3 CPU-s of Python shutdown): not inside the timed call.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any("_Identity" in (cmdline(pid) or "") for pid in descendants(proc_table())):
        time.sleep(0.1)


def run_clipray(
    url_list: Path, out: Path, mark: Callable[[], None], cpus: int, cold_ray: bool = False, **data: Any
) -> dict:
    """clipray's `run_pipeline` on `url_list` into `out`, on a local Ray cluster of `cpus` CPUs
    started (and, unless `cold_ray`, warmed) before the timed call; `data` are `DataConfig` fields
    on top of input, output and `progress=False` (those left out keep clipray's defaults)."""
    import ray

    from pipeline.config import DataConfig
    from pipeline.run import run_pipeline

    # Ray starts its worker processes at nice 15 (RAY_worker_niceness), img2dataset's run at nice 0:
    # on a machine where anything else runs, that alone would starve our actors. Same priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    config = DataConfig(input=str(url_list), output=str(out), progress=False, **data)
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}},
    )
    try:
        if not cold_ray:
            warm_ray_data()
        mark()
        start, epoch = time.perf_counter(), time.time()
        manifest = run_pipeline(config)
        wall = time.perf_counter() - start
        mark()
    finally:
        ray.shutdown()
    # shard spans: each marker is written last, when its shard is done, after `duration_s` of work
    spans = [
        (p.stat().st_mtime - json.loads(p.read_text())["duration_s"], p.stat().st_mtime)
        for p in (out / "_state" / "download").glob("*.json")
    ]
    busy = max(end for _, end in spans) - min(start for start, _ in spans)
    return {
        "wall_s": wall,
        "accepted": manifest["accepted"],
        "images_per_s": manifest["accepted"] / wall,
        "in_shard_images_per_s": manifest["accepted"] / busy,
        "reasons": dict(sorted(manifest["reasons"].items())),
        "workers": min(config.num_download_actors or cpus, len(spans)),
        "shard_spans_s": sorted((round(a - epoch, 2), round(b - epoch, 2)) for a, b in spans),
        "shard_epoch": epoch,
    }


def write_url_list(path: Path, urls: list[str]) -> Path:
    """The list both tools read: Parquet with `url` and `caption` ("image number i")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": urls, "caption": [f"image number {i}" for i in range(len(urls))]}), path)
    return path


@contextlib.contextmanager
def loopback_server(images: list[bytes], urls: int) -> Iterator[tuple[list[str], int]]:
    """`loopback_images.serve` (zero latency, 127.0.0.1) in its own forked process: (its `urls`
    URLs, the process id)."""
    import multiprocessing

    from benchmarks.loopback_images import serve

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Queue()
    server = ctx.Process(target=serve, args=(images, urls, ready), daemon=True)
    server.start()
    try:
        port = ready.get(timeout=60)
        yield [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(urls)], server.pid
    finally:
        server.kill()
        server.join()
