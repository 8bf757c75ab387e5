"""A sweep resumes after its driver dies: `python -m training.tune` is SIGKILLed (with the whole Ray
cluster it started) once Ray Tune's experiment state records a finished trial, while others have
not finished; rerunning the same command resumes the sweep from that state, the finished trials
are not run again, and the others are.

The driver runs in its own session and its own Ray temp dir (RAY_TMPDIR), so the test ends exactly
the processes that driver started: its process group and every descendant, found by PID.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.support.train_shards import write_shards

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, out, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _processes_using(marker: str) -> set[int]:
    """PIDs whose command line names our Ray temp dir (raylet, GCS, agents: not renamed workers)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    found.add(int(entry))
            except OSError:
                pass
    return found


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)


def _trial_states(sweep: Path) -> dict[str, str]:
    states = sorted(sweep.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}  # being rewritten
    return {(t := json.loads(item[0]))["trial_id"]: t["status"] for item in data["trial_data"]}


def _snapshot(sweep: Path, trial_id: str) -> dict:
    run = sweep / "runs" / trial_id
    return {
        "metrics": (run / "metrics.jsonl").read_text(),
        "final_mtime": (run / "final" / "model.safetensors").stat().st_mtime_ns,
        "tune_results": (sweep / trial_id / "result.json").read_text(),
    }


@pytest.mark.heavy
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    write_shards(tmp_path / "train", copies=1, rows_per_shard=150, side=64)
    write_shards(tmp_path / "val", copies=1, rows_per_shard=300, side=64, split="heldout", seed=1)
    config = {
        "model": {"name": "ViT-Tiny"},
        "train": {
            "data": [str(tmp_path / "train")],
            "val_data": [str(tmp_path / "val")],
            "batch_size": 16,
            "samples": 64,
            "val_every": 2,
            "log_every": 2,
            "checkpoint_every": 2,
            "warmup": 1,
            "num_workers": 1,
        },
        "tune": {
            "temperature_init": [0.03, 0.1],
            "early_stopping": False,
            "max_concurrent_trials": 1,
            "storage_path": str(tmp_path / "sweeps"),
            "name": "r",
        },
        "ray": {"num_cpus": 4},
    }
    config_path = tmp_path / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(config))
    sweep = tmp_path / "sweeps" / "r"
    ray_tmp = tempfile.mkdtemp(prefix="crt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "training.tune", "--config", str(config_path)]
    log1, log2 = tmp_path / "driver1.log", tmp_path / "driver2.log"
    try:
        with log1.open("wb") as out:
            driver = subprocess.Popen(
                command, cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 420
        while True:
            states = _trial_states(sweep)
            finished = sorted(t for t, s in states.items() if s == "TERMINATED")
            if finished:
                break
            assert driver.poll() is None, f"the driver exited early:\n{log1.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no finished trial in time:\n{log1.read_text()[-4000:]}"
            time.sleep(0.5)
        before = {t: _snapshot(sweep, t) for t in finished}

        # Kill the driver and every process of its Ray cluster, by PID.
        doomed = {driver.pid} | _descendants(driver.pid) | _processes_using(ray_tmp)
        os.killpg(driver.pid, signal.SIGKILL)
        _kill(doomed)
        driver.wait(timeout=30)
        assert not [p for p in _processes_using(ray_tmp) if _alive(p)]
        assert len(finished) < 2 and not (sweep / "results.csv").exists()

        with log2.open("wb") as out:
            rerun = subprocess.run(
                command, cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, timeout=480
            )
        text = log2.read_text()
        assert rerun.returncode == 0, text[-4000:]
        assert f"resuming sweep {sweep}" in text

        rows = list(csv.DictReader((sweep / "results.csv").open()))
        assert sorted(r["trial_id"] for r in rows) == sorted(_trial_states(sweep))
        assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}, rows
        assert sorted(float(r["temperature_init"]) for r in rows) == [0.03, 0.1]
        for trial_id, snap in before.items():  # not run again: same reports, same final model file
            assert _snapshot(sweep, trial_id) == snap, trial_id
            assert f"Trial {trial_id} started" not in text
        assert (sweep / "best.json").exists() and (sweep / "sweep.png").exists()
    finally:
        leftovers = _processes_using(ray_tmp)
        if leftovers:
            _kill(leftovers)
        shutil.rmtree(ray_tmp, ignore_errors=True)
