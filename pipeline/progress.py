"""What the pipeline tells the user while it runs: one line per phase (`say`), one tqdm bar per
phase in rows (`progress`), both silent with `data.progress: false`, and a warning for each shard
whose download error rate is above `data.warn_error_rate` (`error_rate_warning`).

Every message goes through `storage.redact.redact_text`: a URL or path in it loses its credentials.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any, Callable, Iterable, Optional

from pipeline.config import DataConfig
from pipeline.reasons import DECODE, DOWNLOAD, REASONS
from storage.redact import redact_text

log = logging.getLogger("clipray.pipeline")

# After this many shard warnings in one phase, one last line says the rest are not shown.
MAX_SHARD_WARNINGS = 20
ERROR_STAGES = (DOWNLOAD, DECODE)


def say(data: DataConfig, message: str) -> None:
    message = redact_text(message)
    log.info(message)
    if data.progress:
        print(message, flush=True)


def _warn(data: DataConfig, bar, message: str) -> None:
    """A warning in the progress output (above the bar) and in the log, shown once: when progress
    is on and no logging handler is configured, Python's last-resort handler would print the log
    record to the terminal a second time."""
    message = redact_text(message)
    if data.progress:
        bar.write(f"warning: {message}")
    if not data.progress or log.hasHandlers():
        log.warning(message)


def _stage_of(reason: str) -> str:
    return REASONS[reason][0] if reason in REASONS else DOWNLOAD  # http_<status>


def error_rate_warning(shard: str, counts: dict[str, Any], threshold: float) -> Optional[str]:
    """The warning for one shard whose rows failed to download or decode more often than
    `threshold` (a share of its rows), naming the top reasons; None below it.

    counts: `{rows, reasons: {reason: n}}` of the rows the shard processed. Rejections by the
    filters and the dedup are choices, not errors, and do not count."""
    rows = counts.get("rows", 0)
    errors = Counter({r: n for r, n in counts.get("reasons", {}).items() if _stage_of(r) in ERROR_STAGES})
    failed = sum(errors.values())
    if not rows or failed / rows <= threshold:
        return None
    top = ", ".join(f"{reason} {n}" for reason, n in errors.most_common(3))
    return (
        f"shard {shard}: {failed} of {rows} rows ({failed / rows:.0%}) failed to download or decode "
        f"(top reasons: {top}), above data.warn_error_rate={threshold:g}"
    )


def progress(
    data: DataConfig,
    results,
    desc: str,
    rows: int,
    counts: Optional[Callable[[dict], dict]] = None,
) -> Iterable[dict]:
    """Stream per-shard stats from a Ray Data result, with one tqdm bar in rows.

    counts: for download phases, `stats -> {rows, accepted, reasons}` of the rows a shard
    processed (the whole shard, or the rows a retry ran again): the bar then also shows the images
    accepted so far and images per second, and a shard above `data.warn_error_rate` is warned of.
    Without it the bar counts `stats["rows"]` (or accepted + rejected)."""
    from tqdm.auto import tqdm

    start = time.time()
    accepted = 0
    warnings = 0
    with tqdm(total=rows, desc=desc, unit="row", disable=not data.progress, smoothing=0.1) as bar:
        for row in results.iter_rows():
            stats = json.loads(row["stats"])
            if counts is None:
                bar.update(stats.get("rows", stats.get("accepted", 0) + stats.get("rejected", 0)))
                yield stats
                continue
            done = counts(stats)
            accepted += done.get("accepted", 0)
            bar.update(done.get("rows", 0))
            elapsed = max(time.time() - start, 1e-9)
            bar.set_postfix(accepted=accepted, images_per_s=f"{accepted / elapsed:.1f}")
            message = error_rate_warning(stats["shard"], done, data.warn_error_rate)
            if message is not None:
                warnings += 1
                if warnings <= MAX_SHARD_WARNINGS:
                    _warn(data, bar, message)
                if warnings == MAX_SHARD_WARNINGS:
                    _warn(data, bar, f"{desc}: further shards above data.warn_error_rate are not reported")
            yield stats
