"""Helpers for tests that run `run_training` end to end: the run's metrics rows, its final weights,
whether a checkpoint exists, a thread that SIGKILLs one Ray Train worker of the run, and the
per-sample log (`CLIPRAY_TEST_SAMPLE_LOG`) of the steps each attempt trained."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import torch


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


class WorkerKiller:
    """Sends SIGKILL to one Ray Train worker of a run (a PID the run itself reported in
    metrics.jsonl) once a checkpoint at or after `min_step` exists. Kills nothing else."""

    def __init__(self, read_rows, has_checkpoint, min_step: int, rank: int = 1):
        self.read_rows, self.has_checkpoint = read_rows, has_checkpoint
        self.min_step, self.rank = min_step, rank
        self.killed_at = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                done = [r for r in self.read_rows() if r.get("step", 0) >= self.min_step]
            except (OSError, ValueError):
                done = []
            if done and self.has_checkpoint(self.min_step):
                pid = int(done[-1]["pids"][self.rank])
                os.kill(pid, signal.SIGKILL)
                self.killed_at = done[-1]["step"]
                return
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def local_checkpoint(run_dir: Path):
    return lambda step: (run_dir / f"checkpoint_{step:09d}" / "trainer_state.json").exists()


def trained_samples(log_dir: Path) -> list[dict]:
    """The per-sample log's records of the attempt that last trained each step (a killed attempt's
    steps after its checkpoint are trained again by the next one)."""
    records = [json.loads(line) for f in sorted(log_dir.glob("*.jsonl")) for line in f.read_text().splitlines()]
    latest: dict[int, float] = {}
    for r in records:
        latest[r["step"]] = max(latest.get(r["step"], 0.0), r["started"])
    return [r for r in records if r["started"] == latest[r["step"]]]
