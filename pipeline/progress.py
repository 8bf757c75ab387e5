"""What the pipeline tells the user while it runs: one line per phase (`say`) and one tqdm bar per
phase in rows (`progress`), both silent with `data.progress: false`."""

from __future__ import annotations

import json
import logging
import time
from typing import Iterable

from pipeline.config import DataConfig

log = logging.getLogger("clipray.pipeline")


def say(data: DataConfig, message: str) -> None:
    log.info(message)
    if data.progress:
        print(message, flush=True)


def progress(data: DataConfig, results, desc: str, rows: int) -> Iterable[dict]:
    """Stream per-shard stats from a Ray Data result, with one tqdm bar in rows (and, for the
    download, the images accepted so far and images per second)."""
    from tqdm.auto import tqdm

    start = time.time()
    accepted = 0
    with tqdm(total=rows, desc=desc, unit="row", disable=not data.progress, smoothing=0.1) as bar:
        for row in results.iter_rows():
            stats = json.loads(row["stats"])
            accepted += stats.get("accepted", 0)
            bar.update(stats.get("rows", stats.get("accepted", 0) + stats.get("rejected", 0)))
            if desc == "download":
                elapsed = max(time.time() - start, 1e-9)
                bar.set_postfix(accepted=accepted, images_per_s=f"{accepted / elapsed:.1f}")
            yield stats
