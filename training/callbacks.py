"""Ray Train controller callbacks: the run's metrics files and a readable progress line.

Both run on the Ray Train controller (one per run), once per `ray.train.report`; they see rank 0's
row, whose values are already global (the workers all-reduce before reporting).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from typing import Optional

from storage import Folder


def _user_callback_base():
    from ray.train import UserCallback

    return UserCallback


class MetricsCallback(_user_callback_base()):
    """Every report's rank-0 row -> metrics.jsonl + TensorBoard in the run folder. A remote run
    folder: written to a local staging folder and uploaded at each checkpoint and at the end."""

    def __init__(self, run: Folder):
        self.run = run
        self._writer = None
        self._staging: Optional[str] = None

    def _open(self):
        from training.metrics import METRICS_FILE, MetricsWriter

        if self._writer is None:
            if self.run.local:
                folder = self.run.root
            else:
                self._staging = tempfile.mkdtemp(prefix="clipray-metrics-")
                folder = self._staging
                self.run.download(METRICS_FILE, os.path.join(folder, METRICS_FILE))
            self._writer = MetricsWriter(folder)
        return self._writer

    def after_report(self, run_context, metrics: list, checkpoint) -> None:
        if not metrics:
            return
        row = {k: v for k, v in metrics[0].items() if not k.startswith("_")}
        self._open().write(row)
        if checkpoint is not None or metrics[0].get("_last"):
            self._upload()
        if metrics[0].get("_last"):
            self._close()

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        # Keep what was logged (a failed run's metrics matter most), then close: if Ray Train
        # restarts the worker group (train.max_failures), the next report reopens the writer.
        self._upload()
        self._close()

    def _upload(self) -> None:
        if self._staging is not None:
            self.run.upload(self._staging)

    def _close(self) -> None:
        """Close the writer; a remote run's staging folder is already uploaded and goes."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


class ProgressCallback(_user_callback_base()):
    """One short progress line per report (at most one every `every_s` seconds, and always for
    checkpoints and the last step), in place of Ray Train's per-report log records
    (`train.log_level` hides those)."""

    def __init__(self, name: str, total_steps: int, every_s: float = 10.0):
        self.name, self.total_steps, self.every_s = name, total_steps, every_s
        self._last_print = -math.inf

    def after_report(self, run_context, metrics: list, checkpoint) -> None:
        if not metrics:
            return
        row, now = metrics[0], time.monotonic()
        if checkpoint is None and not row.get("_last") and now - self._last_print < self.every_s:
            return
        self._last_print = now
        print(progress_line(self.name, self.total_steps, row, checkpoint is not None), flush=True)


def progress_line(name: str, total_steps: int, row: dict, checkpointed: bool = False) -> str:
    """`train demo: step 100/391 (26%) loss 2.141 | 342 samples/s | data wait 1% | checkpoint`"""
    step = row.get("step", 0)
    parts = [f"train {name}: step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%)"]
    if isinstance(row.get("loss"), (int, float)):
        parts[0] += f" loss {row['loss']:.3f}"
    if isinstance(row.get("val_loss"), (int, float)):
        parts.append(f"val loss {row['val_loss']:.3f}")
    if isinstance(row.get("samples_per_s"), (int, float)):
        parts.append(f"{row['samples_per_s']:,.0f} samples/s")
    wait, step_time = row.get("data_wait_s"), row.get("step_time_s")
    if isinstance(wait, (int, float)) and isinstance(step_time, (int, float)) and step_time > 0:
        parts.append(f"data wait {100 * wait / step_time:.0f}%")
    if checkpointed:
        parts.append("checkpoint")
    return " | ".join(parts)
