"""The run's metrics: `metrics.jsonl` (one JSON object per report) and TensorBoard event files.

`MetricsWriter` writes into a local folder; for remote storage (s3://...) the controller callback
(`training/callbacks.py`) writes into a staging folder and uploads it to the run directory. After a restart from a
checkpoint the steps go back: rows at or after the first repeated step are dropped from
metrics.jsonl (they belong to the attempt that failed) and TensorBoard purges them too.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from storage import atomic_local_write

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf as strings, numpy/torch scalars as Python numbers."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends report rows to `{folder}/metrics.jsonl` and scalars to `{folder}/tensorboard/`."""

    def __init__(self, folder: str, tensorboard: bool = True):
        self.folder = folder
        self.path = os.path.join(folder, METRICS_FILE)
        self.tensorboard = tensorboard
        self._writer = None
        self._last_step: Optional[int] = None
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(self.path):
            steps = [row.get("step") for row in self.rows() if isinstance(row.get("step"), int)]
            self._last_step = max(steps) if steps else None

    def rows(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def write(self, row: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        step = row.get("step")
        purge = None
        if isinstance(step, int) and self._last_step is not None and step <= self._last_step:
            kept = [r for r in self.rows() if not (isinstance(r.get("step"), int) and r["step"] >= step)]
            atomic_local_write(self.path, lambda tmp: _write_rows(tmp, kept))
            purge = step
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if isinstance(step, int):
            self._last_step = step
            if self.tensorboard:
                self._scalars(row, step, purge)

    def _scalars(self, row: dict[str, Any], step: int, purge: Optional[int]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self._writer is None or purge is not None:
            if self._writer is not None:
                self._writer.close()
            self._writer = SummaryWriter(os.path.join(self.folder, TENSORBOARD_DIR), purge_step=purge)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
